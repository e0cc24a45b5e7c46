"""Prefix-cache figures of docs/benchmarks.md ("Conversations reuse their work"): run against a
`janus serve` HTTP port with the official openai client; prints one JSON object. Not a test.

    python tools/bench/prefix_cache.py BASE_URL IMAGE [--turns 4] [--burst 8]

- chat: a conversation of --turns turns about IMAGE (each turn resends the whole conversation,
  as every chat UI does); time to first token seen by the client, prompt and cached tokens.
- repeat: turn 1 sent again, three times.
- burst: --burst requests at once, each with its own image (IMAGE with one pixel changed per
  request, so no cache can help), wall time of the whole burst and each time to first token.
"""
import argparse
import base64
import io
import json
import sys
import threading
import time

from openai import OpenAI
from PIL import Image

QUESTIONS = [
    "Describe this image in detail.",
    "What colours dominate it?",
    "Is there any text in it?",
    "Summarise it in one sentence.",
    "What would you call it?",
    "Anything unusual?",
]


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, model, messages, max_tokens):
    """Streams one answer: (text, time to first token, usage)."""
    t0 = time.perf_counter()
    ttft = None
    text = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    cached = (usage.prompt_tokens_details.cached_tokens
              if usage.prompt_tokens_details is not None else 0)
    return "".join(text), ttft, {"prompt": usage.prompt_tokens, "cached": cached,
                                 "total_s": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("image")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--only", choices=["chat", "burst"], help="run one part (chat includes repeat)")
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url.rstrip("/") + "/v1", api_key="unused", timeout=600)
    model = client.models.list().data[0].id
    img = Image.open(a.image).convert("RGB")
    out = {"model": model, "chat": [], "repeat": [], "burst": {}}

    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(img)}},
        {"type": "text", "text": QUESTIONS[0]}]}]
    first = None
    for turn in range(a.turns if a.only != "burst" else 0):
        text, ttft, u = ask(client, model, messages, a.max_tokens)
        out["chat"].append({"turn": turn + 1, "ttft_s": round(ttft, 4), **u})
        print(json.dumps(out["chat"][-1]), file=sys.stderr)
        if first is None:
            first = list(messages)
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": QUESTIONS[(turn + 1) % len(QUESTIONS)]}]
    for _ in range(3 if first is not None else 0):
        _, ttft, u = ask(client, model, first, a.max_tokens)
        out["repeat"].append({"ttft_s": round(ttft, 4), **u})

    if a.only == "chat":
        print(json.dumps(out))
        return
    # Each request its own image: one pixel differs.
    uris = []
    for i in range(a.burst):
        im = img.copy()
        px = im.getpixel((i, i))
        im.putpixel((i, i), ((px[0] + 1 + i) % 256, px[1], px[2]))
        uris.append(data_uri(im))
    results = [None] * a.burst

    def one(i):
        msgs = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uris[i]}},
            {"type": "text", "text": QUESTIONS[0]}]}]
        results[i] = ask(client, model, msgs, a.max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(a.burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["burst"] = {
        "requests": a.burst,
        "wall_s": round(time.perf_counter() - t0, 3),
        "ttft_s": sorted(round(r[1], 3) for r in results),
        "cached": [r[2]["cached"] for r in results],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
