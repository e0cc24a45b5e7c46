#!/usr/bin/env bash
# Fairness and memory figures of docs/benchmarks.md ("Bounded, fair engines"), measured on one
# machine in one sitting. Not a test: it prints JSON and numbers for the document.
#
#   tools/bench/fairness.sh BIN_DIR CHECKPOINT [extra `janus serve` flags…]
#
# BIN_DIR holds `janus` and `janus-loadgen` (e.g. target/release); CHECKPOINT is a directory, e.g.
#   janus synth --preset pro-1b --llm-layers 4 --tokenizer tests/fixtures/janus-tiny/model/tokenizer.json --out /tmp/pro1b-4l
# SCENARIOS (env) picks what runs: burst, previews, long (default: all three).
set -euo pipefail
BIN=$1
MODEL=$2
shift 2
EXTRA=("$@")
SCENARIOS=${SCENARIOS:-"burst previews long"}
PORT=${PORT:-50071}
ADDR=127.0.0.1:$PORT
IMAGE=${IMAGE:-$(dirname "$0")/../../tests/fixtures/janus-tiny/wide.png}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

start_server() {
  "$BIN/janus" serve --model "$MODEL" --listen "$ADDR" "${EXTRA[@]}" >"$OUT/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do
    if grep -q "janus: serving on" "$OUT/serve.log"; then return 0; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then cat "$OUT/serve.log"; exit 1; fi
    sleep 0.5
  done
  echo "server did not start" >&2
  exit 1
}

stop_server() {
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}

# Samples the server's RSS every 0.2 s into $OUT/rss.$1 until killed.
sample_rss() {
  while kill -0 "$SERVER" 2>/dev/null; do
    echo "$(date +%s.%N) $(rss_kb "$SERVER")" >>"$OUT/rss.$1"
    sleep 0.2
  done
}

start_server
trap stop_server EXIT
echo "# server $BIN/janus serve --model $MODEL ${EXTRA[*]} (pid $SERVER)"

for s in $SCENARIOS; do
  case $s in
  burst)
    # Eight one-image questions at once (and one alone first): time to first token and the
    # gaps between tokens of running rows, from janus-loadgen.
    "$BIN/janus-loadgen" --server "http://$ADDR" --mode understand --image "$IMAGE" \
      --concurrency 1,8 --max-new-tokens 32
    ;;
  previews)
    # A one-image question beside a client generating n = 16, with previews every row and
    # without: the question's total time.
    for interval in 0 1; do
      "$BIN/janus" generate --server "http://$ADDR" -n 16 --preview-interval "$interval" \
        --format tokens --quiet -o "$OUT/gen.$interval" "a lighthouse at dusk" &
      GEN=$!
      sleep 5
      start=$(date +%s.%N)
      "$BIN/janus" understand --server "http://$ADDR" --image "$IMAGE" --max-new-tokens 16 \
        --min-new-tokens 16 "What is shown?" >/dev/null
      end=$(date +%s.%N)
      echo "{\"scenario\": \"one-image question beside n=16 generation\", \"preview_interval\": $interval, \"question_s\": $(echo "$end - $start" | bc)}"
      kill "$GEN" 2>/dev/null || true
      wait "$GEN" 2>/dev/null || true
      sleep 2
    done
    ;;
  long)
    # The longest prompt the context allows: RSS before, peak during, and 5 s after.
    words=${LONG_WORDS:-8140}
    prompt=$(python3 -c "print('sea ' * $words)")
    sleep 2
    before=$(rss_kb "$SERVER")
    sample_rss long &
    SAMPLER=$!
    start=$(date +%s.%N)
    "$BIN/janus" understand --server "http://$ADDR" --max-new-tokens 4 --min-new-tokens 4 \
      --timeout 3600 "$prompt" >/dev/null
    end=$(date +%s.%N)
    sleep 5
    after=$(rss_kb "$SERVER")
    kill "$SAMPLER" 2>/dev/null || true
    peak=$(awk 'BEGIN {m = 0} {if ($2 > m) m = $2} END {print m}' "$OUT/rss.long")
    echo "{\"scenario\": \"long prompt\", \"words\": $words, \"prompt_s\": $(echo "$end - $start" | bc), \"rss_before_mb\": $((before / 1024)), \"rss_peak_mb\": $((peak / 1024)), \"rss_after_5s_mb\": $((after / 1024))}"
    ;;
  esac
done
