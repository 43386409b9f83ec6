"""Drives the official anthropic Python SDK through capit's proxy: plain and streamed messages,
an auth token sent as Bearer (as Claude Code does), and token counting."""
import json
import os

import anthropic

base_url, key = os.environ["CAPIT_BASE_URL"], os.environ["CAPIT_KEY"]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
messages = [{"role": "user", "content": "hi"}]
out = {}

msg = client.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=messages)
out["plain_text"] = msg.content[0].text
out["plain_output_tokens"] = msg.usage.output_tokens

with client.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=messages) as stream:
    out["stream_text"] = "".join(stream.text_stream)
    out["stream_output_tokens"] = stream.get_final_message().usage.output_tokens

bearer = anthropic.Anthropic(base_url=base_url, auth_token=key, api_key=None, max_retries=0)
out["bearer_text"] = bearer.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=messages).content[0].text
out["count_input_tokens"] = client.messages.count_tokens(model="claude-haiku-4-5", messages=messages).input_tokens

try:
    anthropic.Anthropic(base_url=base_url, api_key="sk-capit-wrong", max_retries=0).messages.create(model="claude-haiku-4-5", max_tokens=5, messages=messages)
except anthropic.AuthenticationError as e:
    out["refusal_status"] = e.status_code

print(json.dumps(out))
