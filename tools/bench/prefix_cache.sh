#!/usr/bin/env bash
# Prefix-cache figures of docs/benchmarks.md: the same conversation, repeat and burst
# (tools/bench/prefix_cache.py) against `janus serve` with the caches on and then off, in one
# sitting, with the server's RSS after each. Not a test: prints JSON lines.
#
#   tools/bench/prefix_cache.sh BIN_DIR CHECKPOINT [extra `janus serve` flags…]
#
# ONLY=chat|burst runs one part; ROUNDS=N repeats the on/off pair N times (interleaved).
# CHECKPOINT e.g. `janus synth --preset pro-1b --llm-layers 4 --tokenizer
# tests/fixtures/janus-tiny/model/tokenizer.json --out /tmp/pro1b-4l`. The openai client comes from
# target/openai-venv (tests/openai/check.sh makes it); PY overrides the interpreter.
set -euo pipefail
BIN=$1
MODEL=$2
shift 2
EXTRA=("$@")
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HERE/../../target/openai-venv/bin/python}
IMAGE=${IMAGE:-$HERE/../../tests/fixtures/janus-tiny/wide.png}
HTTP=${HTTP:-127.0.0.1:18471}
OUT=$(mktemp -d)

run() {
  local label=$1
  shift
  "$BIN/janus" serve --model "$MODEL" --listen 127.0.0.1:0 --http-listen "$HTTP" "$@" "${EXTRA[@]}" \
    >"$OUT/serve.$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    grep -q "janus: serving on" "$OUT/serve.$label.log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$OUT/serve.$label.log"; exit 1; }
    sleep 0.5
  done
  local res
  res=$("$PY" "$HERE/prefix_cache.py" "http://$HTTP" "$IMAGE" ${ONLY:+--only "$ONLY"} 2>"$OUT/bench.$label.log")
  local rss
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "{\"label\": \"$label\", \"rss_kib\": $rss, \"result\": $res}"
}

for _ in $(seq 1 "${ROUNDS:-1}"); do
  run cache-on
  run cache-off --prefix-cache-bytes 0 --image-cache-bytes 0
done
