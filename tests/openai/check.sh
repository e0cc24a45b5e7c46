#!/usr/bin/env bash
# The HTTP port checked with real clients: the official `openai` Python client and the
# playground driven by headless Chromium (Playwright), against a real `janus serve` on the tiny
# fixture with an API key configured.
#
#   tests/openai/check.sh            (after `cargo build --release --bin janus`)
#
# Creates (or reuses) a virtualenv under target/ (JANUS_OPENAI_VENV overrides) with pinned
# openai, playwright, pillow and pytest; installs Debian's chromium when /usr/bin/chromium is
# missing (Playwright's own browsers are never downloaded). Screenshots go to
# target/test-output/. Exit status 0 when every test passes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${JANUS_OPENAI_VENV:-$repo/target/openai-venv}"
out="$repo/target/test-output"
janus="${JANUS_BIN:-$repo/target/release/janus}"
python="${PYTHON:-python3}"
mkdir -p "$out"

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  "openai==1.109.1" "playwright==1.55.0" "pillow==11.3.0" "pytest==8.3.5"
if [ ! -x "$janus" ]; then
  (cd "$repo" && cargo build --release --bin janus)
fi

key="sk-janus-check-$RANDOM$RANDOM"
log="$out/janus-serve.log"
JANUS_API_KEYS="$key" RUST_LOG=warn "$janus" serve \
  --model "$repo/tests/fixtures/janus-tiny/model" \
  --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --grace-period 1 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 600); do
  if grep -q "^janus: serving on " "$log"; then
    url="$(sed -n 's/^janus: http api on \([^ ]*\).*/\1/p' "$log" | head -n1)"
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$log"; echo "janus serve exited"; exit 1
  fi
  sleep 0.2
done
[ -n "$url" ] || { cat "$log"; echo "janus serve did not report its HTTP port"; exit 1; }
echo "== janus serve: $url"

JANUS_HTTP_URL="$url" JANUS_API_KEY="$key" JANUS_TEST_OUTPUT="$out" \
  JANUS_FIXTURE="$repo/tests/fixtures/janus-tiny" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$here"
