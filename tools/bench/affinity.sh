#!/usr/bin/env bash
# Cache hits of 20 four-turn chats through a gateway over two understanding replicas, with
# --balance prefix-affinity and with least-outstanding (tools/bench/affinity.py). Not a test.
#
#   tools/bench/affinity.sh BIN_DIR CHECKPOINT
set -euo pipefail
BIN=$1
MODEL=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HERE/../../target/openai-venv/bin/python}
IMAGE=${IMAGE:-$HERE/../../tests/fixtures/janus-tiny/wide.png}
OUT=$(mktemp -d)
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap stop EXIT

for balance in prefix-affinity least-outstanding; do
  "$BIN/janus-understanding" --model "$MODEL" --listen 127.0.0.1:18481 >"$OUT/u1.log" 2>&1 & PIDS+=($!)
  "$BIN/janus-understanding" --model "$MODEL" --listen 127.0.0.1:18482 >"$OUT/u2.log" 2>&1 & PIDS+=($!)
  "$BIN/janus-generation" --model "$MODEL" --listen 127.0.0.1:18483 >"$OUT/g.log" 2>&1 & PIDS+=($!)
  "$BIN/janus-gateway" --listen 127.0.0.1:18480 --http-listen 127.0.0.1:18489 \
    --understanding-backends 127.0.0.1:18481,127.0.0.1:18482 --generation-backends 127.0.0.1:18483 \
    --balance "$balance" >"$OUT/gw.log" 2>&1 & PIDS+=($!)
  res=$("$PY" "$HERE/affinity.py" http://127.0.0.1:18489 "$IMAGE")
  echo "{\"balance\": \"$balance\", \"result\": $res}"
  stop
done
