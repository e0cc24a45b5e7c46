#!/usr/bin/env bash
# llama.cpp speed anchor for the Janus-Pro language model (CPU).
#
# What it measures: llama.cpp's own throughput (tokens/s, llama-bench) for the Janus LM -- a
# plain Llama decoder, exported from one of our checkpoints by tools/bench/gguf_from_synth.py
# (same shapes; 2-D weights BF16 as the Rust engine keeps them, norms F32, untied lm_head) -- in
# BF16 and in three llama.cpp quantizations (Q8_0, Q4_0, Q4_K_M), so the Rust engine's numbers
# have a reference. Per GGUF, four tests, each repeated $REPS times on $THREADS threads:
#   pp512          prefill 512 tokens into an empty context       (one batch: -b/-ub default 2048/512)
#   tg128          decode 128 tokens one at a time from an empty context
#   pp512 @ d700   prefill 512 tokens after 700 tokens already in the KV cache
#   tg128 @ d700   decode 128 tokens after 700 tokens already in the KV cache
# (700 ~ a Janus understanding prompt: 576 image tokens + text.) The depth is prefilled untimed
# (llama-bench -d/--n-depth; cached between repetitions). Token ids are random (llama-bench), so
# the tokenizer in the GGUF does not matter. llama-bench defaults apply otherwise (notably: KV
# cache f16 -- the Rust engine's is bf16, same size; flash attention "auto"; mmap on); pass
# extra llama-bench flags in EXTRA_ARGS, e.g. EXTRA_ARGS="-ctk bf16 -ctv bf16 -fa on".
#
# Exact commands (defaults), per GGUF $G in $GGUF_DIR/$NAME-{bf16,q8_0,q4_0,q4_k_m}.gguf:
#   $LLAMA_BUILD/bin/llama-bench -m $G -t 2 -p 512 -n 128 -d 0,700 -r 3 -o json > $OUT_DIR/<file>.json
# and, only for GGUFs that are missing, when a checkpoint is given (--ckpt / CKPT):
#   $PYTHON tools/bench/gguf_from_synth.py $CKPT $GGUF_DIR/$NAME-bf16.gguf
#   $LLAMA_BUILD/bin/llama-quantize $GGUF_DIR/$NAME-bf16.gguf $GGUF_DIR/$NAME-<type>.gguf <TYPE> 2
# Then a summary table (tok/s mean +- stdev per test and file) -> $OUT_DIR/summary.md (also printed).
#
# Usage: tools/bench/llamacpp.sh [--build DIR] [--gguf DIR] [--ckpt DIR] [--name NAME]
#                                [--reps N] [--threads N] [--out DIR] [--types "bf16 q4_k_m"]
# Environment (same meaning; flags win): LLAMA_BUILD (/work/llama/build), GGUF_DIR (/tmp/gguf),
#   CKPT (unset), NAME (pro1b), REPS (3), THREADS (2), OUT_DIR (/tmp/llamacpp-bench),
#   TYPES ("bf16 q8_0 q4_0 q4_k_m"), PROMPT (512), GEN (128), DEPTHS (0,700), EXTRA_ARGS (""),
#   PYTHON (/work/llama/venv/bin/python if present, else python3; needs numpy + pyyaml),
#   LLAMA_CPP_SRC (llama.cpp source whose gguf-py the converter uses; see gguf_from_synth.py).
# llama.cpp built from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp (ggml-org/llama.cpp@0c1e57098):
#   cmake -S vendor/llama.cpp -B /work/llama/build -G Ninja -DGGML_NATIVE=ON \
#         -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
#   ninja -C /work/llama/build llama-bench llama-quantize
# Do not run the full benchmark next to a compile: it wants the machine's cores to itself.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLAMA_BUILD="${LLAMA_BUILD:-/work/llama/build}"
GGUF_DIR="${GGUF_DIR:-/tmp/gguf}"
CKPT="${CKPT:-}"
NAME="${NAME:-pro1b}"
REPS="${REPS:-3}"
THREADS="${THREADS:-2}"
OUT_DIR="${OUT_DIR:-/tmp/llamacpp-bench}"
TYPES="${TYPES:-bf16 q8_0 q4_0 q4_k_m}"
PROMPT="${PROMPT:-512}"
GEN="${GEN:-128}"
DEPTHS="${DEPTHS:-0,700}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /work/llama/venv/bin/python ]]; then PYTHON=/work/llama/venv/bin/python; else PYTHON=python3; fi
fi

while [[ $# -gt 0 ]]; do
    case "$1" in
        --build) LLAMA_BUILD="$2"; shift 2 ;;
        --gguf) GGUF_DIR="$2"; shift 2 ;;
        --ckpt) CKPT="$2"; shift 2 ;;
        --name) NAME="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --types) TYPES="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

BENCH="$LLAMA_BUILD/bin/llama-bench"
QUANT="$LLAMA_BUILD/bin/llama-quantize"
[[ -x "$BENCH" ]] || { echo "no llama-bench at $BENCH (set LLAMA_BUILD)" >&2; exit 1; }

gguf_path() { echo "$GGUF_DIR/$NAME-$1.gguf"; }
# llama-quantize's type name for our file suffix.
quant_type() {
    case "$1" in
        q8_0) echo Q8_0 ;; q4_0) echo Q4_0 ;; q4_k_m) echo Q4_K_M ;; q4_k_s) echo Q4_K_S ;;
        q5_k_m) echo Q5_K_M ;; q6_k) echo Q6_K ;; *) echo "unknown type $1" >&2; return 1 ;;
    esac
}

# --- make the GGUFs that are missing ---------------------------------------------------------
mkdir -p "$GGUF_DIR"
BF16="$(gguf_path bf16)"
for t in $TYPES; do
    f="$(gguf_path "$t")"
    [[ -f "$f" ]] && continue
    if [[ ! -f "$BF16" ]]; then
        [[ -n "$CKPT" ]] || { echo "$f missing and no checkpoint given (--ckpt / CKPT)" >&2; exit 1; }
        echo "+ $PYTHON $HERE/gguf_from_synth.py $CKPT $BF16" >&2
        "$PYTHON" "$HERE/gguf_from_synth.py" "$CKPT" "$BF16"
    fi
    [[ "$t" == bf16 ]] && continue
    [[ -x "$QUANT" ]] || { echo "no llama-quantize at $QUANT" >&2; exit 1; }
    echo "+ $QUANT $BF16 $f $(quant_type "$t") $THREADS" >&2
    "$QUANT" "$BF16" "$f.tmp" "$(quant_type "$t")" "$THREADS" > "$GGUF_DIR/$NAME-$t.quantize.log" 2>&1 \
        || { tail -20 "$GGUF_DIR/$NAME-$t.quantize.log" >&2; exit 1; }
    mv "$f.tmp" "$f"
done

# --- benchmark -------------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
JSONS=()
for t in $TYPES; do
    f="$(gguf_path "$t")"
    out="$OUT_DIR/$(basename "$f" .gguf).json"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    cmd=("$BENCH" -m "$f" -t "$THREADS" -p "$PROMPT" -n "$GEN" -d "$DEPTHS" -r "$REPS" -o json $EXTRA_ARGS)
    echo "+ ${cmd[*]} > $out" >&2
    "${cmd[@]}" > "$out" 2> "${out%.json}.log" || { tail -20 "${out%.json}.log" >&2; exit 1; }
    JSONS+=("$out")
done

# --- summary ---------------------------------------------------------------------------------
"$PYTHON" - "$OUT_DIR/summary.md" "${JSONS[@]}" <<'EOF'
import json, os, sys
out, files = sys.argv[1], sys.argv[2:]
rows, info = [], None
for f in files:
    for r in json.load(open(f)):
        info = info or r
        test = f"pp{r['n_prompt']}" if r["n_prompt"] > 0 else f"tg{r['n_gen']}"
        if r.get("n_depth", 0):
            test += f" @ d{r['n_depth']}"
        rows.append((os.path.basename(r["model_filename"]), r["model_size"] / 2**30, r["n_threads"],
                     test, r["avg_ts"], r["stddev_ts"], len(r.get("samples_ts", []))))
lines = []
if info:
    lines.append(f"llama.cpp build {info.get('build_commit')} ({info.get('build_number')}), "
                 f"backends {info.get('backends')}, cpu: {info.get('cpu_info')}, "
                 f"type_k/v {info.get('type_k')}/{info.get('type_v')}, "
                 f"flash_attn {({-1: 'auto', 0: 'off', 1: 'on'}).get(info.get('flash_attn'), info.get('flash_attn'))}, "
                 f"n_batch {info.get('n_batch')}, n_ubatch {info.get('n_ubatch')}")
    lines.append("")
lines.append("| model | GiB | threads | test | tok/s | ± | reps |")
lines.append("|---|---:|---:|---|---:|---:|---:|")
for m, gib, th, test, ts, sd, n in rows:
    lines.append(f"| {m} | {gib:.2f} | {th} | {test} | {ts:.2f} | {sd:.2f} | {n} |")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text, end="")
EOF
echo "JSON: ${JSONS[*]}; summary: $OUT_DIR/summary.md" >&2
