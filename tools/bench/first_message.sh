#!/usr/bin/env bash
# Time to the first streamed message of `janus serve` (tiny fixture, janus-loadgen, 30 requests of
# 4 tokens, one client), twice in one sitting: with the accepted sockets' TCP_NODELAY suppressed
# by an LD_PRELOAD shim (tools/bench/accept_without_nodelay.c, how every port behaved before
# services/common/src/conn.rs), then as built. Prints one JSON line per run.
#
#   cargo build --release --bins && bash tools/bench/first_message.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
shim=target/accept_without_nodelay.so
cc -shared -fPIC -O2 -o "$shim" tools/bench/accept_without_nodelay.c -ldl
run() {
  local label="$1" pre="$2" log
  log="$(mktemp)"
  env $pre RUST_LOG=warn target/release/janus serve --model tests/fixtures/janus-tiny/model \
    --listen 127.0.0.1:0 --http-listen off >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do grep -q "serving on" "$log" && break; sleep 0.1; done
  local url
  url=$(sed -n 's/^janus: serving on \(.*\)$/\1/p' "$log")
  target/release/janus-loadgen --server "$url" --mode understand --concurrency 1 --requests 30 \
    --max-new-tokens 4 2>/dev/null |
    python3 -c 'import json,sys
d=json.load(sys.stdin)
levels=d["levels"] if isinstance(d,dict) else d
for l in levels:
    print(json.dumps({"run":sys.argv[1],"ttft_ms":l["ttft_ms"],"request_ms":l["request_ms"]}))' "$label"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$log"
}
run "accepted sockets without TCP_NODELAY (before)" "LD_PRELOAD=$shim"
run "as built" ""
