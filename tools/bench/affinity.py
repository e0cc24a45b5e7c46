"""Cache hits of chats behind a gateway with several understanding replicas (docs/benchmarks.md,
"Conversations reuse their work"). Not a test: prints one JSON object.

    python tools/bench/affinity.py BASE_URL IMAGE [--conversations 20] [--turns 4]

Each conversation has its own image (IMAGE with one pixel changed) and runs its turns in order,
resending the whole conversation each turn; --parallel conversations run at a time, each
pausing a random 0-50 ms between turns (a user reading). Cacheable tokens of turn k are the
prompt tokens of turn k - 1 (what a replica that answered turn k - 1 holds for certain; how much
of the answer is reused depends on the tokenizer round trip); hits count the cached tokens the
server reported, up to that.
"""
import argparse
import base64
import io
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI
from PIL import Image


def data_uri(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("image")
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4)
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url.rstrip("/") + "/v1", api_key="unused", timeout=600)
    for _ in range(120):
        try:
            model = client.models.list().data[0].id
            break
        except Exception:
            time.sleep(0.5)
    time.sleep(3)  # both replicas seen healthy by the gateway
    base = Image.open(a.image).convert("RGB")

    def conversation(i):
        img = base.copy()
        x, y = i % img.width, i // img.width
        px = img.getpixel((x, y))
        img.putpixel((x, y), ((px[0] + 1) % 256, px[1], px[2]))
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(img)}},
            {"type": "text", "text": "What is in this picture?"}]}]
        turns = []
        rng = random.Random(i)
        for t in range(a.turns):
            time.sleep(rng.uniform(0, 0.05))
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            turns.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
            messages = messages + [{"role": "assistant", "content": r.choices[0].message.content},
                                   {"role": "user", "content": f"Follow-up question {t + 1}?"}]
        return turns

    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(conversation, range(a.conversations)))
    pairs = [(turns[k - 1][0], turns[k][1]) for turns in results for k in range(1, len(turns))]
    cacheable = sum(c for c, _ in pairs)
    cached = sum(min(c, hit) for c, hit in pairs)
    print(json.dumps({"conversations": a.conversations, "turns": a.turns,
                      "cacheable_tokens": cacheable, "cached_tokens": cached,
                      "hit_rate": round(cached / cacheable, 4)}))


if __name__ == "__main__":
    main()
