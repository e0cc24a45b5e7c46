#!/usr/bin/env bash
# Load check through the gateway of a real `janus serve`: STREAMS concurrent streams for SECONDS
# seconds each of understanding (with an image), generation, and both at once (half each).
# Prints one JSON object: per phase the loadgen summary (requests, errors by gRPC status code,
# latency p50/p90/p99 of whole requests, TTFT, per-token/per-step gaps), and the server's RSS at
# start, its peak (VmHWM) and 10 s after the load.
#
#   cargo build --release --workspace --bins
#   tools/bench/loadcheck.sh [MODEL_DIR] [SECONDS] [STREAMS] > loadcheck.json
#
# Defaults: the tiny fixture, 60 s, 64 streams. Not part of CI (it measures, it asserts nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-tests/fixtures/janus-tiny/model}
SECS=${2:-60}
STREAMS=${3:-64}
BIN=target/release
IMAGE=tests/fixtures/janus-tiny/square.png
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

"$BIN/janus" serve --model "$MODEL" --listen 127.0.0.1:0 --http-listen off 2>"$work/serve.log" &
pid=$!
for _ in $(seq 600); do
  grep -q "janus: serving on " "$work/serve.log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.5
done
url=$(grep -o "janus: serving on .*" "$work/serve.log" | head -1 | awk '{print $4}')
kb() { awk -v k="$1:" '$1==k {print $2}' "/proc/$pid/status"; }
rss_start=$(kb VmRSS)

und() { "$BIN/janus-loadgen" --server "$url" --mode understand --concurrency "$1" \
  --duration-s "$SECS" --max-new-tokens 64 --image "$IMAGE" --timeout-s 300; }
gen() { "$BIN/janus-loadgen" --server "$url" --mode generate --concurrency "$1" \
  --duration-s "$SECS" --timeout-s 600; }

und "$STREAMS" >"$work/und.json" 2>/dev/null
gen "$STREAMS" >"$work/gen.json" 2>/dev/null
half=$((STREAMS / 2))
und "$half" >"$work/mix_und.json" 2>/dev/null &
m=$!
gen "$((STREAMS - half))" >"$work/mix_gen.json" 2>/dev/null
wait "$m"
rss_peak=$(kb VmHWM)
rss_load_end=$(kb VmRSS)
sleep 10
rss_after=$(kb VmRSS)
alive=$(kill -0 "$pid" 2>/dev/null && echo True || echo False)
kill -TERM "$pid"
wait "$pid" || true

python3 - "$work" <<PY
import json, sys
w = sys.argv[1]
load = lambda f: json.load(open(f"{w}/{f}"))["levels"][0]
print(json.dumps({
    "command": "tools/bench/loadcheck.sh $MODEL $SECS $STREAMS",
    "model": "$MODEL", "seconds_per_phase": $SECS, "streams": $STREAMS,
    "understand": load("und.json"),
    "generate": load("gen.json"),
    "mixed": {"understand": load("mix_und.json"), "generate": load("mix_gen.json")},
    "server_rss_mb": {"start": round($rss_start / 1024, 1), "peak": round($rss_peak / 1024, 1),
                      "end_of_load": round($rss_load_end / 1024, 1),
                      "10_s_after": round($rss_after / 1024, 1)},
    "server_alive_after": $alive,
}, indent=1))
PY
