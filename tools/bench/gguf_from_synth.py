#!/usr/bin/env python3
"""Janus checkpoint (DeepSeek layout) -> llama-architecture GGUF of the language model only, BF16.

Purpose: a llama.cpp speed anchor (`tools/bench/llamacpp.sh`). The checkpoints this is meant for
(`tools/synth`, e.g. /tmp/pro1b-full) hold random weights, so the output is for speed only; what
has to match the Rust engine (`crates/llm`) exactly is the architecture, the shapes and the
dtypes, and this script checks those against config.json before writing.

Input: CKPT/config.json (`language_config`, defaults exactly as `crates/llm/src/config.rs`,
i.e. transformers.LlamaConfig's: hidden 4096, intermediate 11008, 32 layers, 32 heads,
kv heads = heads, rms_norm_eps 1e-6, rope_theta 10000, vocab 32000, max positions 2048) and
CKPT/model.safetensors with the keys

    language_model.model.embed_tokens.weight                               -> token_embd.weight
    language_model.model.layers.N.self_attn.{q,k,v,o}_proj.weight          -> blk.N.attn_{q,k,v,output}.weight
    language_model.model.layers.N.mlp.{gate,up,down}_proj.weight           -> blk.N.ffn_{gate,up,down}.weight
    language_model.model.layers.N.{input,post_attention}_layernorm.weight  -> blk.N.{attn,ffn}_norm.weight
    language_model.model.norm.weight                                       -> output_norm.weight
    language_model.lm_head.weight                                          -> output.weight (untied)

Everything else (vision tower, aligners, VQ model, generation head) is ignored.

Output dtypes, as llama.cpp's own HF converter (convert_hf_to_gguf.py --outtype bf16) writes them:
  * every 2-D weight (embedding, q/k/v/o, gate/up/down, lm_head): BF16, the checkpoint's raw
    bf16 bits copied unchanged (read from the safetensors as uint16, written through gguf-py's
    raw_dtype=BF16; numpy has no bf16). Only Q and K rows are reordered, see below.
  * the RMSNorm weights (1-D): F32, widened exactly from bf16. The converter forces 1-D / *_norm
    tensors to F32 and llama-quantize keeps them F32; the Rust engine also holds them in f32 on
    the CPU (its bf16-on-CPU mode keeps norms in f32). They are 0.1 MB per layer, no speed effect.
  * general.file_type = MOSTLY_BF16.

RoPE: the checkpoint is HF-Llama style (rotate-half RoPE, as the Rust engine runs it). llama.cpp's
LLM_ARCH_LLAMA uses "normal" (adjacent-pair) RoPE, so the HF converter permutes the rows of
q_proj and k_proj per head (`LlamaModel.permute` in conversion/llama.py, called from
convert_hf_to_gguf.py); we apply the identical permutation:
    w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)
with n_head = num_attention_heads for Q and num_key_value_heads for K. (A pure row reorder:
no effect on speed, but it makes the GGUF compute the same function as the checkpoint.)

Vocabulary: llama.cpp will not load a model without one, and llama-bench needs n_vocab ==
vocab_size (it feeds random token ids < n_vocab). `--vocab` picks it:
  * placeholder: a SentencePiece-style ("llama" tokenizer model) vocab of exactly vocab_size
    tokens: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), the 256 byte tokens <0x00>..<0xFF>, then
    dummy tokens "▁t<id>". Loads everywhere, tokenizes nothing meaningful.
  * tokenizer: the checkpoint's tokenizer.json (byte-level BPE, as DeepSeek's) as a "gpt2" vocab
    with its merges, pre-tokenizer "deepseek-llm", ids past the tokenizer padded with "[PAD<id>]"
    (UNUSED), as the HF converter pads. Needs a BPE tokenizer.json.
  * auto (default): "tokenizer" when tokenizer.json covers all vocab_size ids, else "placeholder".
    The synthetic checkpoints' tokenizer.json is small (/tmp/pro1b-full: 1214 entries vs
    vocab_size 102400), so they get the placeholder vocab; the real Janus-Pro tokenizer
    (~100k entries < 102400) does too. Token text has no effect on llama-bench timings.

gguf-py: the copy vendored in the llama.cpp source used for the benchmark
(--gguf-py DIR, or $LLAMA_CPP_SRC/gguf-py, or the first
/work/llama/llama_cpp_python-*/vendor/llama.cpp/gguf-py). Needs numpy (and PyYAML, imported by
gguf-py). Memory: the 2-D weights are memory-mapped and streamed; only Q/K (permuted) are copied.

Usage:
    gguf_from_synth.py CKPT_DIR OUT.gguf [--vocab auto|placeholder|tokenizer] [--name NAME]
The output is written to OUT.gguf.tmp and renamed when complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import struct
import sys
from pathlib import Path

# --- config: the same defaults as crates/llm/src/config.rs (transformers.LlamaConfig's) -------
RUST_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


def load_llm_config(ckpt: Path) -> dict:
    cfg = json.loads((ckpt / "config.json").read_text())
    lc = cfg.get("language_config")
    if lc is None:
        raise SystemExit(f"{ckpt}/config.json has no language_config")
    c = {k: lc.get(k, d) for k, d in RUST_DEFAULTS.items()}
    # num_key_value_heads: absent (or null) = num_attention_heads, as LlmConfig::kv_heads().
    kv = lc.get("num_key_value_heads")
    c["num_key_value_heads"] = c["num_attention_heads"] if kv is None else kv
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        c[k] = int(c[k])
    c["rms_norm_eps"] = float(c["rms_norm_eps"])
    c["rope_theta"] = float(c["rope_theta"])
    # The same checks as LlmConfig::validate().
    h, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    if h == 0 or nh == 0 or c["num_hidden_layers"] == 0:
        raise SystemExit("hidden_size, num_attention_heads and num_hidden_layers must be > 0")
    if h % nh:
        raise SystemExit(f"hidden_size {h} is not divisible by num_attention_heads {nh}")
    if (h // nh) % 2:
        raise SystemExit(f"head dim {h // nh} must be even for RoPE")
    if nkv == 0 or nh % nkv:
        raise SystemExit(f"num_key_value_heads {nkv} must divide num_attention_heads {nh}")
    c["head_dim"] = h // nh
    # Anything the Rust engine does not implement must not be silently dropped here either.
    for k in ("rope_scaling", "attention_bias", "mlp_bias", "head_dim", "tie_word_embeddings"):
        if lc.get(k) not in (None, False) and not (k == "head_dim" and lc[k] == h // nh):
            raise SystemExit(f"language_config.{k}={lc[k]!r} is not what crates/llm runs")
    return c


# --- gguf-py ----------------------------------------------------------------------------------
def import_gguf(explicit: str | None):
    cands = []
    if explicit:
        cands.append(explicit)
    if os.environ.get("LLAMA_CPP_SRC"):
        cands.append(os.path.join(os.environ["LLAMA_CPP_SRC"], "gguf-py"))
    cands += sorted(glob.glob("/work/llama/llama_cpp_python-*/vendor/llama.cpp/gguf-py"))
    for d in cands:
        if os.path.isfile(os.path.join(d, "gguf", "__init__.py")):
            sys.path.insert(0, d)
            import gguf  # noqa: E402
            return gguf
    raise SystemExit("gguf-py not found: pass --gguf-py or set LLAMA_CPP_SRC (llama.cpp source)")


# --- safetensors, raw -------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class Checkpoint:
    def __init__(self, path: Path):
        import numpy as np
        self.np = np
        self.path = path
        self.header, self.base = read_safetensors_header(path)

    def bf16(self, name: str, shape: tuple[int, ...]):
        """The tensor's raw bf16 bits as a read-only uint16 memmap of `shape` (checked)."""
        np = self.np
        if name not in self.header:
            raise SystemExit(f"{self.path}: missing tensor {name}")
        info = self.header[name]
        if info["dtype"] != "BF16":
            raise SystemExit(f"{name}: dtype {info['dtype']}, expected BF16")
        if tuple(info["shape"]) != tuple(shape):
            raise SystemExit(f"{name}: shape {info['shape']}, config says {list(shape)}")
        start, end = info["data_offsets"]
        assert end - start == 2 * int(np.prod(shape)), name
        return np.memmap(self.path, dtype=np.uint16, mode="r", offset=self.base + start, shape=shape)


def bf16_bits_to_f32(u16):
    np = sys.modules["numpy"]
    return (np.asarray(u16).astype(np.uint32) << 16).view(np.float32)


def permute_rope_rows(w, n_head: int):
    """LlamaModel.permute: HF rotate-half row order -> llama.cpp adjacent-pair order, per head."""
    out, inp = w.shape
    return (w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)).copy()


# --- vocabulary -------------------------------------------------------------------------------
def tokenizer_entries(ckpt: Path):
    """(id -> (text, type)), merges, bos text, eos text, add_bos from tokenizer(.json|_config)."""
    tj = ckpt / "tokenizer.json"
    if not tj.is_file():
        return None
    t = json.loads(tj.read_text())
    model = t.get("model", {})
    if model.get("type") != "BPE":
        return None
    ids = {int(i): (tok, 1) for tok, i in model["vocab"].items()}  # NORMAL
    for a in t.get("added_tokens", []):
        ids[int(a["id"])] = (a["content"], 3 if a.get("special") else 4)  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tc = {}
    if (ckpt / "tokenizer_config.json").is_file():
        tc = json.loads((ckpt / "tokenizer_config.json").read_text())

    def tok_text(v):
        return v.get("content") if isinstance(v, dict) else v
    return ids, merges, tok_text(tc.get("bos_token")), tok_text(tc.get("eos_token")), tc.get("add_bos_token")


def write_placeholder_vocab(w, gguf, n_vocab: int):
    TT = gguf.TokenType
    if n_vocab < 3 + 256 + 1:
        raise SystemExit(f"vocab_size {n_vocab} too small for the placeholder vocab")
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256
    first = len(toks)
    toks += [f"\u2581t{i}" for i in range(first, n_vocab)]
    types += [TT.NORMAL] * (n_vocab - first)
    scores = [0.0] * first + [float(-(i - first)) for i in range(first, n_vocab)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types([int(x) for x in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_tokenizer_vocab(w, gguf, n_vocab: int, tok):
    ids, merges, bos, eos, add_bos = tok
    if max(ids) >= n_vocab:
        raise SystemExit(f"tokenizer.json has ids >= vocab_size {n_vocab}")
    toks, types = [], []
    for i in range(n_vocab):
        text, ty = ids.get(i, (f"[PAD{i}]", int(gguf.TokenType.UNUSED)))
        toks.append(text)
        types.append(int(ty))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")  # Janus' LM tokenizer is DeepSeek-LLM's
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    rev = {t: i for i, t in enumerate(toks)}
    if bos in rev:
        w.add_bos_token_id(rev[bos])
    if eos in rev:
        w.add_eos_token_id(rev[eos])
    if add_bos is not None:
        w.add_add_bos_token(bool(add_bos))


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", type=Path, help="checkpoint dir (config.json + model.safetensors)")
    ap.add_argument("out", type=Path, help="output .gguf")
    ap.add_argument("--vocab", choices=("auto", "placeholder", "tokenizer"), default="auto")
    ap.add_argument("--name", default=None, help="general.name (default: checkpoint dir name)")
    ap.add_argument("--gguf-py", default=None, help="llama.cpp's gguf-py dir")
    args = ap.parse_args()

    gguf = import_gguf(args.gguf_py)
    import numpy as np  # noqa: F401  (gguf-py needs it too)

    c = load_llm_config(args.ckpt)
    H, FF, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    NH, NKV, HD, V = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    ck = Checkpoint(args.ckpt / "model.safetensors")

    tok = tokenizer_entries(args.ckpt)
    n_tok = 0 if tok is None else len(tok[0])
    vocab = args.vocab
    if vocab == "auto":
        vocab = "tokenizer" if tok is not None and n_tok >= V else "placeholder"
    if vocab == "tokenizer" and tok is None:
        raise SystemExit("--vocab tokenizer needs a BPE tokenizer.json")

    tmp = args.out.with_name(args.out.name + ".tmp")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    w = gguf.GGUFWriter(tmp, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(args.name or f"{args.ckpt.name} (Janus LM, synthetic)")
    w.add_description("Janus language model converted by tools/bench/gguf_from_synth.py; speed anchor only")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if vocab == "placeholder":
        write_placeholder_vocab(w, gguf, V)
    else:
        write_tokenizer_vocab(w, gguf, V, tok)

    BF16 = gguf.GGMLQuantizationType.BF16
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES

    def name(t, bid=None):  # as the converter's format_tensor_name(..., suffix=".weight")
        return N[t].format(bid=bid) + ".weight"

    def add_bf16(gname, arr):
        w.add_tensor(gname, arr, raw_dtype=BF16)

    def add_norm(gname, hf):
        w.add_tensor(gname, bf16_bits_to_f32(ck.bf16(hf, (H,))))

    p = "language_model.model."
    add_bf16(name(T.TOKEN_EMBD), ck.bf16(p + "embed_tokens.weight", (V, H)))
    for i in range(L):
        b = f"{p}layers.{i}."
        add_norm(name(T.ATTN_NORM, i), b + "input_layernorm.weight")
        add_bf16(name(T.ATTN_Q, i), permute_rope_rows(ck.bf16(b + "self_attn.q_proj.weight", (NH * HD, H)), NH))
        add_bf16(name(T.ATTN_K, i), permute_rope_rows(ck.bf16(b + "self_attn.k_proj.weight", (NKV * HD, H)), NKV))
        add_bf16(name(T.ATTN_V, i), ck.bf16(b + "self_attn.v_proj.weight", (NKV * HD, H)))
        add_bf16(name(T.ATTN_OUT, i), ck.bf16(b + "self_attn.o_proj.weight", (H, NH * HD)))
        add_norm(name(T.FFN_NORM, i), b + "post_attention_layernorm.weight")
        add_bf16(name(T.FFN_GATE, i), ck.bf16(b + "mlp.gate_proj.weight", (FF, H)))
        add_bf16(name(T.FFN_UP, i), ck.bf16(b + "mlp.up_proj.weight", (FF, H)))
        add_bf16(name(T.FFN_DOWN, i), ck.bf16(b + "mlp.down_proj.weight", (H, FF)))
    add_norm(name(T.OUTPUT_NORM), p + "norm.weight")
    add_bf16(name(T.OUTPUT), ck.bf16("language_model.lm_head.weight", (V, H)))

    print(f"{args.ckpt} -> {args.out}: llama, {L} layers, hidden {H}, ffn {FF}, heads {NH}/{NKV} "
          f"(head_dim {HD}), vocab {V} ({vocab}; tokenizer.json has {n_tok}), ctx "
          f"{c['max_position_embeddings']}, eps {c['rms_norm_eps']}, theta {c['rope_theta']}", flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
