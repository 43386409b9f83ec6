"""Drives the official google-genai Python SDK through capit's proxy: plain and streamed
generateContent on v1beta and v1, and token counting."""
import json
import os

from google import genai
from google.genai import errors, types

base_url, key = os.environ["CAPIT_BASE_URL"], os.environ["CAPIT_KEY"]
client = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=base_url))
out = {}

reply = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
out["plain_text"] = reply.text
out["plain_thoughts"] = reply.usage_metadata.thoughts_token_count

text, last = "", None
for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"):
    text += chunk.text or ""
    last = chunk.usage_metadata
out["stream_text"] = text
out["stream_candidates"] = last.candidates_token_count

v1 = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=base_url, api_version="v1"))
out["v1_text"] = v1.models.generate_content(model="gemini-2.5-flash", contents="hi").text
out["count_total_tokens"] = client.models.count_tokens(model="gemini-2.5-flash", contents="hi").total_tokens

wrong = genai.Client(api_key="wrong", http_options=types.HttpOptions(base_url=base_url))
try:
    wrong.models.generate_content(model="gemini-2.5-flash", contents="hi")
except errors.APIError as e:
    out["refusal_status"] = e.code

print(json.dumps(out))
