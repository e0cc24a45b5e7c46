#!/usr/bin/env python3
"""The three large-M parts of DeepSeek's Janus-Pro in PyTorch on the CPU, timed beside `janus bench`.

Each part is the reference's own op sequence, with the shapes of the checkpoint's config.json
(Janus-Pro defaults where it is silent), so that its time sits next to the key of the same name
in `janus bench`'s JSON:

- `vision` (`vision_s`): one 1×3×384×384 image through the SigLIP-L/16 tower as Janus builds it
  (`CLIPVisionTower(select_layer=-1)` → timm `VisionTransformer`): 16×16 stride-16 patch conv,
  + pos_embed (no class token), all 24 pre-norm blocks (LayerNorm eps 1e-6, fused qkv,
  `F.scaled_dot_product_attention` as timm's fused_attn, MLP with exact erf GELU), the final
  LayerNorm (global_pool "map" with ignore_head: the attention pool never runs), then the
  understanding aligner (Linear → GELU → Linear), as `UnderstandingModel::image_features` does.
- `vq` (`vq_decode_s`): one 24×24 grid through `VQModel.decode_code` (L2-normalised codebook
  lookup, post_quant_conv, VQ-16 decoder: conv_in, mid Res/Attn/Res, five levels of 3
  ResnetBlocks (GroupNorm(32)+swish+conv3×3) with AttnBlocks at 24×24 and nearest ×2 upsample +
  conv, norm_out + swish + conv_out → 3×384×384), then `clip((x+1)/2·255)` to uint8 (the
  reference's post-processing; `janus bench` converts to RGB8 inside its timing too).
- `prefill` (`prefill_s`): a `--prefill-tokens`-long prompt (698 = `janus bench`'s understanding
  prompt: 576 image tokens in it) through transformers' `LlamaForCausalLM` (= `LlamaModel` +
  `lm_head`) with `use_cache=True`: token embedding lookup, the image features scattered in, the
  decoder layers, final RMSNorm, and `lm_head` on the last position only (`logits_to_keep=1`, as
  `janus bench` and transformers' `generate` do) or on every position with `--all-logits` (a
  plain `language_model(inputs_embeds=...)` call), then the argmax of the last logits.

Weights are random (timing does not depend on their values): only config.json is read.

    /work/venv-torch/bin/python tools/bench/torch_reference_cpu.py --model /tmp/pro1b-4l --threads 2

Each part runs once untimed-for-the-median (reported as `*_cold_s`), then `--repeats` times.
Prints one JSON document: per part the times, their median, the GFLOP of the part (2·m·n·k of
every matmul and convolution, attention products included, causal attention counted on its
lower triangle) and the achieved GFLOP/s; `*_gflop_janus_bench` is the count `janus bench`
uses for the same key (it leaves out the aligner and the lm_head), for comparing rates.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time

PARTS = ("vision", "vq", "prefill")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json is read)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of vision,vq,prefill")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per part after the warm-up")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "bf16", "bf16-autocast"],
        help="f32; bf16 = bf16 weights and activations (the reference's `.to(torch.bfloat16)`); "
        "bf16-autocast = f32 weights under torch.autocast('cpu', bfloat16)",
    )
    p.add_argument("--prefill-tokens", type=int, default=698, help="prompt length (janus bench's understanding prompt is 698)")
    p.add_argument("--all-logits", action="store_true", help="prefill computes lm_head logits at every position (default: last only)")
    p.add_argument("--attn", default=None, help="transformers attn_implementation for the LLM (default: transformers' own, sdpa)")
    args = p.parse_args()
    args.parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad} (known: {','.join(PARTS)})")
    if args.repeats < 1 or args.threads < 1 or args.prefill_tokens < 1:
        p.error("--repeats, --threads and --prefill-tokens must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Config (the same defaults and overrides as crates/pipeline/src/config.rs)


# `llm_config` and `hf_llama_config` are the sibling script's (the same defaults for what the
# 7B config omits, the same transformers config).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import hf_llama_config, llm_config  # noqa: E402


def vision_config(cfg):
    """siglip_large_patch16_384 (the only tower Janus-Pro names), with explicit params applied."""
    p = cfg.get("vision_config", {}).get("params", {})
    vc = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4.0}
    for k in vc:
        if k in p:
            vc[k] = p[k]
    sel = p.get("select_layer", -1)
    # create_siglip_vit builds only the blocks up to select_layer (-1: all of them).
    if sel <= 0:
        vc["layers"] = min(vc["layers"], vc["layers"] + sel + 1)
    else:
        vc["layers"] = min(vc["layers"], sel)
    vc["grid"] = vc["image_size"] // vc["patch_size"]
    vc["patches"] = vc["grid"] ** 2
    vc["mlp_hidden"] = int(vc["width"] * vc["mlp_ratio"])
    return vc


def aligner_config(cfg, key, input_dim, n_embed):
    p = cfg.get(key, {}).get("params", {})
    return {"input_dim": p.get("input_dim", input_dim), "n_embed": p.get("n_embed", n_embed), "depth": p.get("depth", 2)}


def vq_config(cfg):
    """VQ-16 (`VQ_16()` of janus/models/vq_model.py), with explicit params applied."""
    p = cfg.get("gen_vision_config", {}).get("params", {})
    vq = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "num_res_blocks": 2, "codebook_size": 16384, "codebook_embed_dim": 8}
    for k in vq:
        if k in p:
            vq[k] = p[k]
    if "image_token_size" in p:
        vq["codebook_size"] = p["image_token_size"]
    if "n_embed" in p:
        vq["codebook_embed_dim"] = p["n_embed"]
    return vq


# ---------------------------------------------------------------------------------------------
# FLOP counts (2 × multiply-adds)


def vision_flops(vc, al):
    n, w, hid, p = vc["patches"], vc["width"], vc["mlp_hidden"], vc["patch_size"]
    patch = n * w * 3 * p * p
    block = n * (3 * w * w + w * w + 2 * w * hid) + 2 * n * n * w  # qkv, proj, fc1, fc2; q·kᵀ, a·v
    tower = patch + vc["layers"] * block
    aligner = n * (al["input_dim"] * al["n_embed"] + (al["depth"] - 1) * al["n_embed"] ** 2)
    return 2 * (tower + aligner), 2 * tower


def vq_flops(vq, side):
    """VqConfig::decoder_macs of crates/vq, × 2."""
    ch, mult, z, nrb = vq["ch"], vq["ch_mult"], vq["z_channels"], vq["num_res_blocks"]
    n = len(mult)
    conv3 = lambda ci, co, hw: ci * co * 9 * hw
    res = lambda ci, co, hw: conv3(ci, co, hw) + conv3(co, co, hw) + (ci * co * hw if ci != co else 0)
    attn = lambda c, hw: 4 * c * c * hw + 2 * hw * hw * c
    hw = side * side
    c = ch * mult[-1]
    macs = vq["codebook_embed_dim"] * z * hw + conv3(z, c, hw) + 2 * res(c, c, hw) + attn(c, hw)
    for i in range(n):
        co = ch * mult[n - 1 - i]
        for _ in range(nrb + 1):
            macs += res(c, co, hw)
            c = co
            if i == 0:
                macs += attn(c, hw)
        if i != n - 1:
            hw *= 4
            macs += conv3(c, c, hw)
    return 2 * (macs + conv3(c, 3, hw))


def prefill_flops(lc, t, all_logits):
    h, nh, nkv = lc["hidden_size"], lc["num_attention_heads"], lc["num_key_value_heads"]
    hd = h // nh
    proj = t * (h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * lc["intermediate_size"])
    attn = t * (t + 1) * nh * hd  # q·kᵀ and a·v over the causal lower triangle: 2 × t(t+1)/2
    layers = lc["num_hidden_layers"] * (proj + attn)
    head = (t if all_logits else 1) * h * lc["vocab_size"]
    return 2 * (layers + head), 2 * layers


# ---------------------------------------------------------------------------------------------
# Modules (the reference's forward code, random weights)


def build_vision(torch, nn, F, vc, al):
    w, heads = vc["width"], vc["heads"]
    hd = w // heads

    class Attention(nn.Module):  # timm / janus siglip_vit.Attention, fused_attn path
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(w, 3 * w, bias=True)
            self.proj = nn.Linear(w, w, bias=True)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(w, eps=1e-6)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(w, eps=1e-6)
            self.fc1 = nn.Linear(w, vc["mlp_hidden"])
            self.act = nn.GELU()  # exact (erf)
            self.fc2 = nn.Linear(vc["mlp_hidden"], w)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            p = vc["patch_size"]
            self.proj = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=True)
            self.pos_embed = nn.Parameter(torch.randn(1, vc["patches"], w) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(vc["layers"])])
            self.norm = nn.LayerNorm(w, eps=1e-6)
            layers = [nn.Linear(al["input_dim"], al["n_embed"])]
            for _ in range(1, al["depth"]):
                layers += [nn.GELU(), nn.Linear(al["n_embed"], al["n_embed"])]
            self.aligner = nn.Sequential(*layers)

        def forward(self, pixels):
            x = self.proj(pixels).flatten(2).transpose(1, 2)  # PatchEmbed: [b, 576, w]
            x = x + self.pos_embed
            x = self.norm(self.blocks(x))  # forward_features; the head is ignored
            return self.aligner(x)

    return Tower()


def build_vq(torch, nn, F, vq):
    def Normalize(c):
        return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)

    def nonlinearity(x):
        return x * torch.sigmoid(x)

    class ResnetBlock(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
            self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else None

        def forward(self, x):
            h = self.conv1(nonlinearity(self.norm1(x)))
            h = self.conv2(nonlinearity(self.norm2(h)))
            if self.nin_shortcut is not None:
                x = self.nin_shortcut(x)
            return x + h

    class AttnBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm = Normalize(c)
            self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
            self.proj_out = nn.Conv2d(c, c, 1)

        def forward(self, x):
            h_ = self.norm(x)
            q, k, v = self.q(h_), self.k(h_), self.v(h_)
            b, c, h, w = q.shape
            q = q.reshape(b, c, h * w).permute(0, 2, 1)
            k = k.reshape(b, c, h * w)
            w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
            w_ = F.softmax(w_, dim=2)
            v = v.reshape(b, c, h * w)
            h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
            return x + self.proj_out(h_)

    class Upsample(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 1, 1)

        def forward(self, x):
            # Janus HEAD interpolates in x's dtype (the first release cast to bf16 here).
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            ch, mult, nrb = vq["ch"], vq["ch_mult"], vq["num_res_blocks"]
            n = len(mult)
            block_in = ch * mult[-1]
            self.conv_in = nn.Conv2d(vq["z_channels"], block_in, 3, 1, 1)
            self.mid = nn.ModuleList([ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in)])
            self.conv_blocks = nn.ModuleList()
            for i_level in reversed(range(n)):
                blk = nn.Module()
                blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
                block_out = ch * mult[i_level]
                for _ in range(nrb + 1):
                    blk.res.append(ResnetBlock(block_in, block_out))
                    block_in = block_out
                    if i_level == n - 1:
                        blk.attn.append(AttnBlock(block_in))
                blk.upsample = Upsample(block_in) if i_level != 0 else None
                self.conv_blocks.append(blk)
            self.norm_out = Normalize(block_in)
            self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

        def forward(self, z):
            h = self.conv_in(z)
            for m in self.mid:
                h = m(h)
            for blk in self.conv_blocks:
                for i, r in enumerate(blk.res):
                    h = r(h)
                    if len(blk.attn) > 0:
                        h = blk.attn[i](h)
                if blk.upsample is not None:
                    h = blk.upsample(h)
            return self.conv_out(nonlinearity(self.norm_out(h)))

    class VQDecode(nn.Module):
        def __init__(self):
            super().__init__()
            e = vq["codebook_embed_dim"]
            self.embedding = nn.Embedding(vq["codebook_size"], e)
            self.post_quant_conv = nn.Conv2d(e, vq["z_channels"], 1)
            self.decoder = Decoder()

        def forward(self, codes, side):
            # quantize.get_codebook_entry (l2_norm=True), then decode, then post-processing.
            emb = F.normalize(self.embedding.weight, p=2, dim=-1)
            z = emb[codes].reshape(codes.shape[0], side, side, emb.shape[1]).permute(0, 3, 1, 2).contiguous()
            dec = self.decoder(self.post_quant_conv(z))
            return torch.clamp((dec.float().permute(0, 2, 3, 1) + 1) / 2 * 255, 0, 255).to(torch.uint8)

    return VQDecode()


def build_llm(torch, lc, attn):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {} if attn is None else {"attn_implementation": attn}
    hf = hf_llama_config(LlamaConfig, lc, tie_word_embeddings=False, **kw)
    model = LlamaForCausalLM(hf)
    impl = getattr(model.config, "_attn_implementation", None)
    return model, f"transformers {transformers.__version__} LlamaForCausalLM (attn {impl})"


# ---------------------------------------------------------------------------------------------


def timed(fn, repeats):
    t = time.perf_counter()
    fn()
    cold = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return cold, times


def parallel_summary(torch):
    """The lines of torch.__config__.parallel_info() that say what runs the kernels."""
    out = {}
    for line in torch.__config__.parallel_info().splitlines():
        s = line.strip()
        if " : " in s:
            k, v = s.split(" : ", 1)
            out[k.strip()] = v.strip()
        elif "Math Kernel Library" in s or "MKL-DNN" in s or "oneDNN" in s:
            out["mkl" if "Math Kernel" in s else "onednn"] = s
        elif ": " in s:  # "ATen parallel backend: OpenMP"
            k, v = s.split(": ", 1)
            out[k.strip()] = v.strip()
    return out


def main():
    args = parse_args()
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    cfg = json.load(open(f"{args.model}/config.json"))
    lc, vc, vq = llm_config(cfg), vision_config(cfg), vq_config(cfg)
    al = aligner_config(cfg, "aligner_config", vc["width"], lc["hidden_size"])
    weight_dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = args.dtype == "bf16-autocast"

    result = {
        "model": args.model,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "parallel": parallel_summary(torch),
        "repeats": args.repeats,
        "covers": {},
    }

    def run_part(name, build, call, flops):
        torch.manual_seed(0)
        t = time.perf_counter()
        torch.set_default_dtype(weight_dt)  # build in the weight dtype: no f32 copy in bf16
        try:
            module, inputs = build()
        finally:
            torch.set_default_dtype(torch.float32)
        module.eval()
        build_s = time.perf_counter() - t

        def once():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                call(module, inputs)

        cold, times = timed(once, args.repeats)
        med = statistics.median(times)
        gf, gf_rust = flops[0] / 1e9, flops[1] / 1e9
        row = {
            f"{name}_s": round(med, 4),
            f"{name}_cold_s": round(cold, 4),
            f"{name}_times_s": [round(x, 4) for x in times],
            f"{name}_gflop": round(gf, 1),
            f"{name}_gflop_per_s": round(gf / med, 1),
            f"{name}_gflop_janus_bench": round(gf_rust, 1),
            f"{name}_build_s": round(build_s, 2),
        }
        print(json.dumps(row), file=sys.stderr)
        result.update(row)
        del module, inputs
        gc.collect()

    for part in args.parts:
        if part == "vision":
            result["covers"]["vision"] = (
                f"patch conv + pos_embed, {vc['layers']} SigLIP blocks (SDPA, erf GELU), final LayerNorm, "
                f"aligner mlp_gelu depth {al['depth']} {al['input_dim']}->{al['n_embed']}; 1 image "
                f"{vc['image_size']}x{vc['image_size']} ({vc['patches']} tokens)"
            )

            def build():
                m = build_vision(torch, nn, F, vc, al)
                px = torch.rand(1, 3, vc["image_size"], vc["image_size"]) * 2 - 1
                return m, px.to(weight_dt)

            run_part("vision", build, lambda m, x: m(x), vision_flops(vc, al))
        elif part == "vq":
            side = vc["grid"]  # 24: the 576-token grid Janus generates
            result["covers"]["vq_decode"] = (
                f"decode_code of 1 grid {side}x{side}: L2-normalised codebook lookup, post_quant_conv, "
                f"VQ decoder ch {vq['ch']} x {vq['ch_mult']} -> 3x{16 * side}x{16 * side}, clip((x+1)/2*255) to uint8"
            )

            def build():
                m = build_vq(torch, nn, F, vq)
                codes = torch.randint(0, vq["codebook_size"], (1, side * side))
                return m, codes

            flops = vq_flops(vq, side)
            run_part("vq_decode", build, lambda m, c: m(c, side), (flops, flops))
        elif part == "prefill":
            t_len = args.prefill_tokens
            n_img = min(vc["patches"], t_len)
            start = max(0, min(42, t_len - n_img))  # where janus bench's prompt has its image
            result["prompt_tokens"] = t_len
            result["prefill_logits"] = "all positions" if args.all_logits else "last position only"
            holder = {}

            def build():
                model, engine = build_llm(torch, lc, args.attn)
                holder["engine"] = engine
                ids = torch.randint(0, lc["vocab_size"], (1, t_len))
                mask = torch.zeros(1, t_len, dtype=torch.bool)
                mask[0, start : start + n_img] = True
                feats = torch.randn(n_img, lc["hidden_size"]) * 0.02
                return model, (ids, mask, feats.to(weight_dt))

            def call(model, inp):
                ids, mask, feats = inp
                emb = model.model.embed_tokens(ids)
                emb[mask] = feats.to(emb.dtype)  # prepare_inputs_embeds
                out = model(inputs_embeds=emb, use_cache=True, logits_to_keep=0 if args.all_logits else 1)
                out.logits[:, -1, :].argmax(-1)

            result["covers"]["prefill"] = (
                f"embed_tokens of {t_len} ids + {n_img} image rows scattered in, "
                f"{lc['num_hidden_layers']} Llama layers (h {lc['hidden_size']}, I {lc['intermediate_size']}), "
                f"final norm, lm_head on {'all positions' if args.all_logits else 'the last position'}, argmax; use_cache=True"
            )
            run_part("prefill", build, call, prefill_flops(lc, t_len, args.all_logits))
            result["engine"] = holder.get("engine")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
