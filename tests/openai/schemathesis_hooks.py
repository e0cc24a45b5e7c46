"""schemathesis hooks of tests/openai/check.sh.

The served OpenAPI document says in JSON Schema everything the server checks that JSON Schema
can say; the two rules below it can only state in words. Positive cases (those schemathesis
expects the server to accept) are made to follow them; negative cases are left alone.

- An image_url must hold an image the server can decode: the pattern says `data:image/png;
  base64,…`, but no schema says which bytes are a PNG. Each such URL becomes the fixture's PNG.
- min_tokens may not exceed the new tokens the answer may have (max_completion_tokens, else
  max_tokens, else the server's default, JANUS_MAX_NEW_TOKENS here): JSON Schema cannot compare
  two fields. A larger min_tokens is lowered to that.
"""
import base64
import os
import pathlib

import schemathesis

FIXTURE = pathlib.Path(os.environ["JANUS_FIXTURE"])
PNG_URI = "data:image/png;base64," + base64.b64encode((FIXTURE / "square.png").read_bytes()).decode()
DEFAULT_MAX_NEW_TOKENS = int(os.environ.get("JANUS_MAX_NEW_TOKENS", "32"))


def _positive(case) -> bool:
    meta = getattr(case, "meta", None)
    return meta is not None and meta.generation.mode.is_positive


def _decodable_images(body: dict) -> None:
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            url = part.get("image_url")
            if isinstance(url, dict) and isinstance(url.get("url"), str):
                url["url"] = PNG_URI
            elif isinstance(url, str):
                part["image_url"] = PNG_URI


def _min_within_max(body: dict) -> None:
    low = body.get("min_tokens")
    if not isinstance(low, (int, float)):
        return
    high = body.get("max_completion_tokens")
    if high is None:
        high = body.get("max_tokens")
    if high is None:
        high = DEFAULT_MAX_NEW_TOKENS
    if low > high:
        body["min_tokens"] = high


@schemathesis.hook
def map_case(context, case):
    if _positive(case) and case.operation.path == "/v1/chat/completions" and isinstance(case.body, dict):
        _decodable_images(case.body)
        _min_within_max(case.body)
    return case
