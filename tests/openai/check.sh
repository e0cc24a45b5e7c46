#!/usr/bin/env bash
# The HTTP port checked with real clients: the official `openai` Python client and the
# playground driven by headless Chromium (Playwright), then schemathesis against the served
# OpenAPI document, all against a real `janus serve` on the tiny fixture with an API key
# configured.
#
#   tests/openai/check.sh            (after `cargo build --release --bin janus`)
#
# Creates (or reuses) a virtualenv under target/ (JANUS_OPENAI_VENV overrides) with pinned
# openai, playwright, pillow, pytest and schemathesis; installs Debian's chromium when
# /usr/bin/chromium is missing (Playwright's own browsers are never downloaded). Screenshots
# and the schemathesis report go to target/test-output/. Exit status 0 when every test passes
# and schemathesis finds nothing.
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
  "openai==1.109.1" "playwright==1.55.0" "pillow==11.3.0" "pytest==8.4.2" "schemathesis==4.32.5"
if [ ! -x "$janus" ]; then
  (cd "$repo" && cargo build --release --bin janus)
fi

key="sk-janus-check-$RANDOM$RANDOM"
log="$out/janus-serve.log"
# A small --max-new-tokens-limit keeps schemathesis' answers short (the served document says it).
JANUS_API_KEYS="$key" RUST_LOG=warn "$janus" serve \
  --model "$repo/tests/fixtures/janus-tiny/model" --max-new-tokens-limit 32 \
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

# Every check schemathesis has (`--checks all` less max_response_time, a wall-clock limit, which
# `all` would switch on at 10 s: drawing 16 images takes longer on a small CPU), on every
# operation of the served document (which carries this server's limits), positive and negative
# cases, with the key. schemathesis.toml says why a 504 is not a server error here;
# schemathesis_hooks.py supplies what JSON Schema cannot say (a decodable image, min_tokens ≤
# max_tokens). Non-zero exit when it finds anything. JANUS_SCHEMATHESIS_SEED picks other cases.
checks="not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance"
checks+=",response_schema_conformance,negative_data_rejection,positive_data_acceptance,missing_required_header"
checks+=",unsupported_method,allow_header_conformance,use_after_free,ensure_resource_availability,ignored_auth"
checks+=",object_level_authorization"
echo "== schemathesis $url/openapi.json"
(cd "$out" && JANUS_FIXTURE="$repo/tests/fixtures/janus-tiny" JANUS_MAX_NEW_TOKENS=32 \
  SCHEMATHESIS_HOOKS="$here/schemathesis_hooks.py" \
  "$venv/bin/st" --config-file "$here/schemathesis.toml" run "$url/openapi.json" \
    --url "$url" --checks "$checks" --max-examples 30 --seed "${JANUS_SCHEMATHESIS_SEED:-1}" --workers 1 \
    -H "Authorization: Bearer $key" --request-timeout 120 \
    --report junit --report-dir "$out/schemathesis")
