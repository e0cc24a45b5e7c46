#!/usr/bin/env bash
# gpu-check.sh [--device cuda:0|cpu] [--quick] — the one prepared check for a lent GPU host.
#
# Runs from the folder unpacked from janus-cuda-<cap>.tar.xz (scripts/build-cuda.sh): no Rust
# toolchain needed. A few minutes on an H200; every step is time-boxed. Steps:
#   env      uname, nproc, memory, nvidia-smi (when present)
#   ldd      `ldd ./janus` and `ldd ./parity`; a CUDA library "not found" fails the run (not on cpu)
#   parity   the parity tests (`parity::` of the `pipeline` test binary, staged as ./parity) on
#            the tiny fixture on DEV in f32 (the fixture's tolerances)
#   parity_bf16  the same in bf16 compute (tests/pipeline/parity.rs `Tol::BF16`: cosine >= 0.999, ...)
#   synth    `janus synth --preset pro-7b` into a temp dir on local disk
#            (cpu --quick: pro-1b with 2 LLM layers)
#   bench    `janus bench --device DEV --dtype bf16 --gen-n 1,4,16` (cpu: f32, --quick 1,4),
#            JSON out; GPU memory sampled
#   bench_q8 optional: the same with `--weight-dtype q8` (on CUDA candle's QMatMul on GGUF
#            Q8_0 blocks), `--gen-n 1,16`, at most 96 steps; JSON in summary.json's "bench_q8"
#   torch    optional: torch version and CUDA availability, when python3 has torch
#   reference  optional, when python3 has torch: DeepSeek's generation loop in PyTorch
#            (torch_reference.py: transformers' LlamaModel if installed) on the same config,
#            device, dtype and n values; summary.json gets ours/reference step-time ratios
# Everything lands in $OUT (default ./gpu-check-out): one log per step, bench.json, summary.json.
# Exit status: 0 when every required step passed, 1 otherwise.
#
# Env overrides: JANUS_BIN (default ./janus), PARITY_BIN (default ./parity), JANUS_FIXTURE_DIR
# (default ./fixtures/janus-tiny, else ../tests/fixtures/janus-tiny), OUT, PRESET, LLM_LAYERS,
# DTYPE, GEN_STEPS, GEN_N, Q8_GEN_N, DECODE_TOKENS, JANUS_THREADS, KEEP_MODEL=1 (keep the synthetic checkpoint),
# WORK_DIR (where the checkpoint goes, default $TMPDIR or /tmp), T_<STEP> (timeout in s per step).
set -euo pipefail

DEVICE=cuda:0
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cpu) ON_GPU=0 ;;
  cuda:[0-9]*) ON_GPU=1 ;;
  *) echo "gpu-check.sh: --device must be cpu or cuda:N, got '$DEVICE'" >&2; exit 2 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JANUS_BIN="${JANUS_BIN:-$HERE/janus}"
PARITY_BIN="${PARITY_BIN:-$HERE/parity}"
if [ -z "${JANUS_FIXTURE_DIR:-}" ]; then
  for d in "$HERE/fixtures/janus-tiny" "$HERE/../tests/fixtures/janus-tiny"; do
    if [ -f "$d/golden.json" ]; then JANUS_FIXTURE_DIR="$(cd "$d" && pwd)"; break; fi
  done
fi
FIXTURE="${JANUS_FIXTURE_DIR:?no fixture found: set JANUS_FIXTURE_DIR}"
OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# What runs, per device and --quick (all overridable).
if [ "$ON_GPU" = 1 ]; then
  PRESET="${PRESET:-pro-7b}"
  DTYPE="${DTYPE:-bf16}"
  if [ "$QUICK" = 1 ]; then GEN_STEPS="${GEN_STEPS:-96}"; else GEN_STEPS="${GEN_STEPS:-576}"; fi
  DECODE_TOKENS="${DECODE_TOKENS:-32}"
  GEN_N="${GEN_N:-1,4,16}"
else
  DTYPE="${DTYPE:-f32}"
  if [ "$QUICK" = 1 ]; then
    PRESET="${PRESET:-pro-1b}"; LLM_LAYERS="${LLM_LAYERS:-2}"
    GEN_STEPS="${GEN_STEPS:-8}"; DECODE_TOKENS="${DECODE_TOKENS:-8}"
  else
    PRESET="${PRESET:-pro-1b}"; LLM_LAYERS="${LLM_LAYERS:-4}"
    GEN_STEPS="${GEN_STEPS:-96}"; DECODE_TOKENS="${DECODE_TOKENS:-32}"
  fi
  if [ "$QUICK" = 1 ]; then GEN_N="${GEN_N:-1,4}"; else GEN_N="${GEN_N:-1,4,16}"; fi
fi
LLM_LAYERS="${LLM_LAYERS:-}"
Q8_GEN_N="${Q8_GEN_N:-1,16}"

WORK_DIR="${WORK_DIR:-${TMPDIR:-/tmp}}"
MODEL_DIR="$(mktemp -d "$WORK_DIR/janus-gpu-check.XXXXXX")"
SAMPLER_PID=""
cleanup() {
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
  if [ "${KEEP_MODEL:-0}" = 1 ]; then echo "kept checkpoint: $MODEL_DIR" >&2; else rm -rf "$MODEL_DIR"; fi
}
trap cleanup EXIT

STEPS_TSV="$OUT/steps.tsv"
printf 'step\trc\tseconds\tnote\n' >"$STEPS_TSV"
FAILED=()
note() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# step NAME TIMEOUT_S REQUIRED(1|0) CMD... : stdout -> $OUT/NAME.out, stderr -> $OUT/NAME.log
step() {
  local name="$1" secs="$2" required="$3"; shift 3
  local var="T_${name^^}"
  secs="${!var:-$secs}"
  note "$name (timeout ${secs}s): $*"
  local t0=$SECONDS rc=0
  # timeout runs programs, not shell functions: run a function step in a child bash.
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' bash "$@"; fi
  timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log" || rc=$?
  local dt=$((SECONDS - t0)) what=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="timed out after ${secs}s"
  elif [ "$rc" -ne 0 ]; then what="failed (rc $rc)"; fi
  if [ "$rc" -ne 0 ] && [ "$required" != 1 ]; then what="$what, optional"; fi
  printf '%s\t%d\t%d\t%s\n' "$name" "$rc" "$dt" "$what" >>"$STEPS_TSV"
  note "$name: $what in ${dt}s"
  if [ "$rc" -ne 0 ]; then
    tail -n 20 "$OUT/$name.log" >&2 || true
    if [ "$required" = 1 ]; then FAILED+=("$name"); fi
  fi
  return 0
}

# ---------------------------------------------------------------- CUDA libraries
# The cuda build links libcudart/libcublas/libcurand (.so.13/.so.10) and the driver's libcuda.so.1.
# On the GPU host they come from the PyTorch cu130 venv's nvidia wheels and from the driver.
if [ "$ON_GPU" = 1 ]; then
  extra=""
  for mod in nvidia.cu13 nvidia.cudnn; do
    d="$(timeout 60 python3 -c "import $mod as m; print(list(m.__path__)[0])" 2>/dev/null || true)"
    if [ -n "$d" ] && [ -d "$d/lib" ]; then extra="${extra:+$extra:}$d/lib"; fi
  done
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    d="$(find / -xdev -name libcuda.so.1 -not -path '*/stubs/*' 2>/dev/null | head -n1 || true)"
    if [ -n "$d" ]; then extra="${extra:+$extra:}$(dirname "$d")"; fi
  fi
  if [ -n "$extra" ]; then export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
fi

note "device=$DEVICE quick=$QUICK preset=$PRESET${LLM_LAYERS:+ llm_layers=$LLM_LAYERS} dtype=$DTYPE gen_steps=$GEN_STEPS gen_n=$GEN_N decode_tokens=$DECODE_TOKENS"
note "janus=$JANUS_BIN parity=$PARITY_BIN fixture=$FIXTURE out=$OUT model_dir=$MODEL_DIR"

# ---------------------------------------------------------------- env
env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  echo "nproc: $(nproc)"
  free -g 2>/dev/null || true
  df -h "$WORK_DIR" 2>/dev/null || true
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  if [ -f "$HERE/BUILD-INFO.txt" ]; then sed -n '1,8p' "$HERE/BUILD-INFO.txt"; fi
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
    nvidia-smi || true
  else
    echo "nvidia-smi: not on PATH"
  fi
}
export HERE WORK_DIR JANUS_BIN PARITY_BIN ON_GPU
export -f env_info
step env 60 0 env_info

# ---------------------------------------------------------------- ldd
ldd_check() {
  local b missing=0
  for b in "$JANUS_BIN" "$PARITY_BIN"; do
    echo "== ldd $b"
    ldd "$b" || missing=1
  done
  if grep -q 'not found' <(ldd "$JANUS_BIN" 2>&1; ldd "$PARITY_BIN" 2>&1); then
    echo "MISSING:"
    { ldd "$JANUS_BIN"; ldd "$PARITY_BIN"; } 2>&1 | grep 'not found' | sort -u
    missing=1
  fi
  if [ "$missing" = 1 ] && [ "$ON_GPU" = 1 ]; then return 1; fi
  return 0
}
export -f ldd_check
step ldd 30 1 ldd_check
cat "$OUT/ldd.out"

# ---------------------------------------------------------------- parity
# tests/pipeline/parity.rs picks its fixture from JANUS_FIXTURE_DIR (the compiled-in default is
# the build machine's path), its device from JANUS_PARITY_DEVICE and its compute dtype from
# JANUS_PARITY_DTYPE: f32 with the fixture's tolerances, then bf16 with Tol::BF16.
parity_threads="$(nproc)"
# A run that matched no test (PARITY_BIN not the `pipeline` harness) must not pass as one that held.
parity_ran() {
  if ! grep -qE '^test result: ok\. [1-9][0-9]* passed' <<<"$2"; then
    note "$1: no parity test passed (${2:-no test result line}): is PARITY_BIN the pipeline test harness?"
    FAILED+=("$1: no test ran")
  fi
}
step parity 300 1 env JANUS_FIXTURE_DIR="$FIXTURE" JANUS_PARITY_DEVICE="$DEVICE" JANUS_PARITY_DTYPE=f32 \
  "$PARITY_BIN" parity:: --test-threads="$parity_threads"
PARITY_RESULT="$(grep -h '^test result:' "$OUT/parity.out" | tail -n1 || true)"
note "parity f32: ${PARITY_RESULT:-no test result line}"
parity_ran parity "$PARITY_RESULT"
step parity_bf16 420 1 env JANUS_FIXTURE_DIR="$FIXTURE" JANUS_PARITY_DEVICE="$DEVICE" JANUS_PARITY_DTYPE=bf16 \
  "$PARITY_BIN" parity:: --test-threads="$parity_threads"
PARITY_BF16_RESULT="$(grep -h '^test result:' "$OUT/parity_bf16.out" | tail -n1 || true)"
note "parity bf16: ${PARITY_BF16_RESULT:-no test result line}"
parity_ran parity_bf16 "$PARITY_BF16_RESULT"

# ---------------------------------------------------------------- synth
synth_args=(synth --preset "$PRESET" --tokenizer "$FIXTURE/model/tokenizer.json" --out "$MODEL_DIR/model")
if [ -n "$LLM_LAYERS" ]; then synth_args+=(--llm-layers "$LLM_LAYERS"); fi
step synth 420 1 "$JANUS_BIN" "${synth_args[@]}"
du -sh "$MODEL_DIR/model" >>"$OUT/synth.out" 2>&1 || true

# ---------------------------------------------------------------- bench
if [ -f "$MODEL_DIR/model/config.json" ]; then
  if [ "$ON_GPU" = 1 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits \
      -lms 500 >"$OUT/gpu-samples.csv" 2>/dev/null &
    SAMPLER_PID=$!
  fi
  bench_cmd=("$JANUS_BIN")
  if [ -n "${JANUS_THREADS:-}" ]; then bench_cmd+=(--threads "$JANUS_THREADS"); fi
  bench_cmd+=(bench --model "$MODEL_DIR/model" --device "$DEVICE" --dtype "$DTYPE"
    --decode-tokens "$DECODE_TOKENS" --gen-steps "$GEN_STEPS" --gen-n "$GEN_N")
  if [ -x /usr/bin/time ]; then bench_cmd=(/usr/bin/time -v "${bench_cmd[@]}"); fi
  step bench 480 1 "${bench_cmd[@]}"
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""; fi
  # bench prints one JSON document on stdout.
  cp "$OUT/bench.out" "$OUT/bench.json"
  # The language model's layers as 8-bit blocks: on CUDA they go through candle's QMatMul
  # (GGUF Q8_0, the bytes `janus quantize` writes), a path the CPU-only CI never runs.
  qbench_cmd=("$JANUS_BIN")
  if [ -n "${JANUS_THREADS:-}" ]; then qbench_cmd+=(--threads "$JANUS_THREADS"); fi
  qbench_cmd+=(bench --model "$MODEL_DIR/model" --device "$DEVICE" --dtype "$DTYPE" --weight-dtype q8
    --decode-tokens "$DECODE_TOKENS" --gen-steps "$(( GEN_STEPS < 96 ? GEN_STEPS : 96 ))" --gen-n "$Q8_GEN_N")
  step bench_q8 420 0 "${qbench_cmd[@]}"
  if python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$OUT/bench_q8.out" 2>/dev/null; then
    cp "$OUT/bench_q8.out" "$OUT/bench_q8.json"
  fi
else
  printf 'bench\t-1\t0\tskipped: no checkpoint\n' >>"$STEPS_TSV"
  FAILED+=(bench)
  echo '{}' >"$OUT/bench.json"
fi
PEAK_RSS_KB="$(sed -n 's/.*Maximum resident set size (kbytes): *//p' "$OUT/bench.log" 2>/dev/null | tail -n1)"
GPU_MEM_PEAK_MIB=""
if [ -s "$OUT/gpu-samples.csv" ]; then
  GPU_MEM_PEAK_MIB="$(awk -F', *' '$2+0 > m { m = $2+0 } END { print m+0 }' "$OUT/gpu-samples.csv")"
fi

# ---------------------------------------------------------------- torch (optional)
torch_info() {
  python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(),
      "name", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
}
if command -v python3 >/dev/null; then
  export -f torch_info
  step torch 120 0 torch_info
  TORCH="$(tr -d '\n' <"$OUT/torch.out")"
  [ -n "$TORCH" ] || TORCH="no torch ($(tail -n1 "$OUT/torch.log" 2>/dev/null || true))"
  REF_PY=""
  for f in "$HERE/torch_reference.py" "$HERE/../tools/bench/torch_reference.py"; do
    if [ -f "$f" ]; then REF_PY="$f"; break; fi
  done
  if [ -n "$REF_PY" ] && grep -q '^torch' "$OUT/torch.out" 2>/dev/null && [ -f "$MODEL_DIR/model/config.json" ]; then
    ref_steps=$(( GEN_STEPS < 96 ? GEN_STEPS : 96 ))
    ref_args=(--model "$MODEL_DIR/model" --device "$DEVICE" --dtype "$DTYPE" --n "$GEN_N" --steps "$ref_steps")
    if [ -n "${JANUS_THREADS:-}" ]; then ref_args+=(--threads "$JANUS_THREADS"); fi
    step reference 420 0 python3 "$REF_PY" "${ref_args[@]}"
  fi
else
  TORCH="no python3"
fi
REF_JSON="null"
if [ -s "$OUT/reference.out" ] && python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$OUT/reference.out" 2>/dev/null; then
  cp "$OUT/reference.out" "$OUT/reference.json"
  # ours / reference mean step time per n (below 1 = we are faster).
  REF_JSON="$(python3 - "$OUT/bench.json" "$OUT/reference.json" <<'PY'
import json, sys
ours, ref = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
mine = {r["n"]: r["mean_step_ms"] for r in ours.get("generation", {}).get("by_n", [])}
out = {"reference": ref, "step_ratio_ours_over_reference": {
    str(r["n"]): round(mine[r["n"]] / r["mean_step_ms"], 3) for r in ref["by_n"] if r["n"] in mine}}
print(json.dumps(out))
PY
)" || REF_JSON="null"
fi

# ---------------------------------------------------------------- summary
json_str() { local s="$1"; s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\t'/ }"; printf '"%s"' "$s"; }
bench_json="$(tr -d '\n' <"$OUT/bench.json")"
if command -v python3 >/dev/null && ! python3 -c 'import json,sys; json.loads(sys.stdin.read())' <<<"$bench_json" 2>/dev/null; then
  bench_json="null"
fi
[ -n "$bench_json" ] || bench_json="null"
bench_q8_json="null"
if [ -s "$OUT/bench_q8.json" ]; then bench_q8_json="$(tr -d '\n' <"$OUT/bench_q8.json")"; fi
{
  printf '{\n'
  printf '  "device": %s, "quick": %s, "preset": %s, "llm_layers": %s, "dtype": %s,\n' \
    "$(json_str "$DEVICE")" "$([ "$QUICK" = 1 ] && echo true || echo false)" "$(json_str "$PRESET")" \
    "${LLM_LAYERS:-null}" "$(json_str "$DTYPE")"
  printf '  "gen_steps": %s, "gen_n": %s, "decode_tokens": %s,\n' "$GEN_STEPS" "$(json_str "$GEN_N")" "$DECODE_TOKENS"
  printf '  "janus_bin": %s, "parity_bin": %s,\n' "$(json_str "$JANUS_BIN")" "$(json_str "$PARITY_BIN")"
  printf '  "steps": ['
  sep=""
  while IFS=$'\t' read -r name rc secs what; do
    printf '%s\n    {"step": %s, "rc": %s, "seconds": %s, "result": %s}' "$sep" "$(json_str "$name")" "$rc" "$secs" "$(json_str "$what")"
    sep=","
  done < <(tail -n +2 "$STEPS_TSV")
  printf '\n  ],\n'
  printf '  "parity": %s, "parity_bf16": %s,\n' "$(json_str "${PARITY_RESULT:-}")" "$(json_str "${PARITY_BF16_RESULT:-}")"
  printf '  "bench": %s,\n' "$bench_json"
  printf '  "bench_q8": %s,\n' "$bench_q8_json"
  printf '  "bench_peak_rss_kb": %s, "gpu_mem_peak_mib": %s,\n' "${PEAK_RSS_KB:-null}" "${GPU_MEM_PEAK_MIB:-null}"
  printf '  "torch": %s,\n' "$(json_str "$TORCH")"
  printf '  "reference": %s,\n' "$REF_JSON"
  printf '  "failed": ['
  sep=""
  for f in "${FAILED[@]+"${FAILED[@]}"}"; do printf '%s%s' "$sep" "$(json_str "$f")"; sep=", "; done
  printf '],\n  "ok": %s\n}\n' "$([ "${#FAILED[@]}" -eq 0 ] && echo true || echo false)"
} >"$OUT/summary.json"

echo
echo "================ gpu-check summary ($DEVICE, quick=$QUICK) ================"
column -t -s $'\t' "$STEPS_TSV" 2>/dev/null || cat "$STEPS_TSV"
echo "parity: f32 ${PARITY_RESULT:-none}; bf16 ${PARITY_BF16_RESULT:-none}"
echo "bench:  $bench_json"
echo "bench_q8: $bench_q8_json"
echo "bench peak RSS: ${PEAK_RSS_KB:-?} kB; GPU memory peak: ${GPU_MEM_PEAK_MIB:-n/a} MiB"
echo "torch:  $TORCH"
echo "reference: $REF_JSON"
echo "files:  $OUT (summary.json, steps.tsv, <step>.log/.out, bench.json)"
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "RESULT: FAILED (${FAILED[*]})"
  exit 1
fi
echo "RESULT: OK"
