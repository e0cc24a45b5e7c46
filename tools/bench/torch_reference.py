#!/usr/bin/env python3
"""DeepSeek's Janus-Pro image-generation loop in PyTorch, timed beside `janus bench`.

The loop is the one of DeepSeek's `generation_inference.py` (Janus repository, README "Text-to-Image
Generation"): the prompt's conditional and unconditional rows are prefilled, then every step runs
`language_model.model` on one token with `use_cache=True`, `gen_head` on the last hidden state,
classifier-free guidance on the two rows of each image, softmax + multinomial sampling, and
`gen_embed` + `gen_aligner` for the next input. The language model is transformers'
`LlamaModel` when transformers is installed (what the reference runs), otherwise a plain-torch
Llama with the same eager semantics (a KV cache grown with torch.cat every step, as transformers'
DynamicCache does).

Weights are random (timing does not depend on their values), shaped by the checkpoint's
config.json, so only the config is read: the GPU host needs torch and nothing else.

    python3 tools/bench/torch_reference.py --model /tmp/pro7b --device cuda:0 --dtype bf16 --n 1,4,16

Prints one JSON document: per n, the prefill time and the mean ms per step over `--steps` steps
(one synchronisation after the loop, as the reference has none inside it), plus device memory.
"""

import argparse
import json
import math
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json is read)")
    p.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--n", default="1", help="images per request, comma-separated (e.g. 1,4,16)")
    p.add_argument("--steps", type=int, default=96, help="generation steps timed per n (576 = a whole image)")
    p.add_argument("--prompt-tokens", type=int, default=18, help="prompt length (janus bench's prompt is 18)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; 0 = torch's default)")
    p.add_argument("--no-transformers", action="store_true", help="use the plain-torch Llama even if transformers is installed")
    return p.parse_args()


def llm_config(cfg):
    """language_config with transformers.LlamaConfig's defaults for what the 7B config omits."""
    lc = dict(cfg.get("language_config", {}))
    lc.setdefault("hidden_size", 4096)
    lc.setdefault("num_attention_heads", 32)
    lc.setdefault("intermediate_size", 11008)
    lc.setdefault("rms_norm_eps", 1e-6)
    lc.setdefault("rope_theta", 10000.0)
    lc.setdefault("num_hidden_layers", 32)
    lc.setdefault("num_key_value_heads", lc["num_attention_heads"])
    lc.setdefault("max_position_embeddings", 16384)
    lc.setdefault("vocab_size", 102400)
    return lc


def hf_llama_config(LlamaConfig, lc, **extra):
    """transformers' `LlamaConfig` for the language config `lc` (see `llm_config`)."""
    return LlamaConfig(
        hidden_size=lc["hidden_size"],
        intermediate_size=lc["intermediate_size"],
        num_hidden_layers=lc["num_hidden_layers"],
        num_attention_heads=lc["num_attention_heads"],
        num_key_value_heads=lc["num_key_value_heads"],
        rms_norm_eps=lc["rms_norm_eps"],
        rope_theta=lc["rope_theta"],
        max_position_embeddings=lc["max_position_embeddings"],
        vocab_size=lc["vocab_size"],
        **extra,
    )


def main():
    args = parse_args()
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = json.load(open(f"{args.model}/config.json"))
    lc = llm_config(cfg)
    gh = cfg.get("gen_head_config", {}).get("params", {})
    ga = cfg.get("gen_aligner_config", {}).get("params", {})
    gv = cfg.get("gen_vision_config", {}).get("params", {})
    hidden = lc["hidden_size"]
    image_token_size = gh.get("image_token_size", gv.get("codebook_size", 16384))
    image_token_embed = gh.get("image_token_embed", hidden)
    gen_embed_dim = ga.get("input_dim", gv.get("codebook_embed_dim", 8))
    aligner_depth = ga.get("depth", 2)

    torch.manual_seed(0)
    engine = "plain-torch"
    torch.set_default_dtype(dt)  # build the modules in the compute dtype (no f32 copy of 7B)
    with torch.device(dev):
        if not args.no_transformers:
            try:
                from transformers import LlamaConfig, LlamaModel

                hf = hf_llama_config(LlamaConfig, lc)
                model = LlamaModel(hf).to(dt).eval()
                import transformers

                engine = f"transformers {transformers.__version__} LlamaModel"
            except ImportError:
                model = None
        else:
            model = None
        if model is None:
            model = PlainLlama(lc, nn, F, torch).to(dt).eval()
        gen_head = nn.Sequential(
            nn.Linear(hidden, image_token_embed), nn.GELU(), nn.Linear(image_token_embed, image_token_size)
        ).to(dt).eval()
        gen_embed = nn.Embedding(image_token_size, gen_embed_dim).to(dt)
        layers = [nn.Linear(gen_embed_dim, hidden)]
        for _ in range(1, aligner_depth):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        gen_aligner = nn.Sequential(*layers).to(dt).eval()
    torch.set_default_dtype(torch.float32)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(n, steps):
        """The reference loop for one request of n images; returns (prefill s, mean step ms)."""
        ids = torch.randint(0, lc["vocab_size"], (args.prompt_tokens,), device=dev)
        tokens = ids.repeat(2 * n, 1)
        tokens[1::2, 1:-1] = 0  # the unconditional rows: pad all but the first and last token
        embeds = model.embed_tokens(tokens)
        sync()
        t0 = time.perf_counter()
        out = model(inputs_embeds=embeds, use_cache=True)
        sync()
        prefill = time.perf_counter() - t0
        generated = torch.zeros((n, steps), dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        for i in range(steps):
            logits = gen_head(out.last_hidden_state[:, -1, :])
            cond, uncond = logits[0::2, :], logits[1::2, :]
            logits = uncond + 5.0 * (cond - uncond)
            probs = torch.softmax(logits.float() / 1.0, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1)
            generated[:, i] = nxt.squeeze(dim=-1)
            nxt = torch.cat([nxt.unsqueeze(dim=1), nxt.unsqueeze(dim=1)], dim=1).view(-1)
            inputs_embeds = gen_aligner(gen_embed(nxt)).unsqueeze(dim=1)
            out = model(inputs_embeds=inputs_embeds, use_cache=True, past_key_values=out.past_key_values)
        sync()
        return prefill, (time.perf_counter() - t0) * 1e3 / steps

    result = {
        "engine": engine,
        "torch": torch.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "layers": lc["num_hidden_layers"],
        "hidden_size": hidden,
        "steps_timed": args.steps,
        "by_n": [],
    }
    with torch.inference_mode():
        run(1, 2)  # warm-up: kernels, allocator
        for n in [int(x) for x in args.n.split(",") if x]:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            prefill, step_ms = run(n, args.steps)
            row = {"n": n, "prefill_s": round(prefill, 4), "mean_step_ms": round(step_ms, 3)}
            if dev.type == "cuda":
                row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
            result["by_n"].append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps(result, indent=2))


def PlainLlama(lc, nn, F, torch):
    """transformers' LlamaModel forward (eager attention, DynamicCache-style torch.cat cache)."""
    h, nh = lc["hidden_size"], lc["num_attention_heads"]
    nkv, hd = lc["num_key_value_heads"], lc["hidden_size"] // lc["num_attention_heads"]
    eps, theta = lc["rms_norm_eps"], lc["rope_theta"]

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(h))

        def forward(self, x):
            dt = x.dtype
            x = x.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return self.weight * x.to(dt)

    def rotate_half(x):
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((-b, a), dim=-1)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
            self.q_proj = nn.Linear(h, nh * hd, bias=False)
            self.k_proj = nn.Linear(h, nkv * hd, bias=False)
            self.v_proj = nn.Linear(h, nkv * hd, bias=False)
            self.o_proj = nn.Linear(nh * hd, h, bias=False)
            self.gate_proj = nn.Linear(h, lc["intermediate_size"], bias=False)
            self.up_proj = nn.Linear(h, lc["intermediate_size"], bias=False)
            self.down_proj = nn.Linear(lc["intermediate_size"], h, bias=False)

        def forward(self, x, cos, sin, cache, mask):
            b, t, _ = x.shape
            r = self.input_layernorm(x)
            q = self.q_proj(r).view(b, t, nh, hd).transpose(1, 2)
            k = self.k_proj(r).view(b, t, nkv, hd).transpose(1, 2)
            v = self.v_proj(r).view(b, t, nkv, hd).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if cache is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            new_cache = (k, v)
            if nkv != nh:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            att = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)
            if mask is not None:
                att = att + mask
            att = torch.softmax(att.float(), dim=-1).to(q.dtype)
            y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, nh * hd)
            x = x + self.o_proj(y)
            r = self.post_attention_layernorm(x)
            x = x + self.down_proj(F.silu(self.gate_proj(r)) * self.up_proj(r))
            return x, new_cache

    class Out:
        def __init__(self, last_hidden_state, past_key_values):
            self.last_hidden_state, self.past_key_values = last_hidden_state, past_key_values

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(lc["vocab_size"], h)
            self.layers = nn.ModuleList([Layer() for _ in range(lc["num_hidden_layers"])])
            self.norm = RMSNorm()
            self.register_buffer(
                "inv_freq", 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd)), persistent=False
            )

        def forward(self, inputs_embeds, use_cache=True, past_key_values=None):
            x = inputs_embeds
            b, t, _ = x.shape
            start = 0 if past_key_values is None else past_key_values[0][0].shape[2]
            pos = torch.arange(start, start + t, device=x.device).float()
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
            mask = None
            if t > 1:
                mask = torch.full((t, start + t), float("-inf"), device=x.device).triu(start + 1).to(x.dtype)
            caches = []
            for i, layer in enumerate(self.layers):
                x, c = layer(x, cos, sin, None if past_key_values is None else past_key_values[i], mask)
                caches.append(c)
            return Out(self.norm(x), caches)

    return Model()


if __name__ == "__main__":
    main()
