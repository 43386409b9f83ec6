"""Drives the official openai Python SDK through capit's proxy (plain, streamed, streamed with
usage) and prints what it saw as one JSON document for the Rust test to check."""
import json
import os

import openai

client = openai.OpenAI(base_url=os.environ["CAPIT_BASE_URL"], api_key=os.environ["CAPIT_KEY"], max_retries=0)
out = {}

plain = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}])
out["plain_text"] = plain.choices[0].message.content
out["plain_prompt_tokens"] = plain.usage.prompt_tokens

text = ""
chunks_without_choices = 0
for chunk in client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True):
    if not chunk.choices:
        chunks_without_choices += 1
        continue
    text += chunk.choices[0].delta.content or ""
out["stream_text"] = text
out["stream_chunks_without_choices"] = chunks_without_choices

usage = None
for chunk in client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
out["stream_usage_completion_tokens"] = usage

try:
    client.chat.completions.create(model="not-allowed", messages=[])
except openai.PermissionDeniedError as e:
    out["refusal_status"] = e.status_code
    out["refusal_message"] = e.message

# The Responses API (what Codex CLI speaks), plain and streamed, and embeddings.
resp = client.responses.create(model="test-model", input="hi")
out["responses_text"] = resp.output_text
out["responses_output_tokens"] = resp.usage.output_tokens
completed = None
with client.responses.stream(model="test-model", input="hi") as stream:
    for event in stream:
        if event.type == "response.completed":
            completed = event.response
out["responses_stream_output_tokens"] = completed.usage.output_tokens if completed else None
emb = client.embeddings.create(model="test-model", input="hello")
out["embedding_prompt_tokens"] = emb.usage.prompt_tokens

print(json.dumps(out))
