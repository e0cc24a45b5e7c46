#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for MINUTES minutes, one after another (not part of CI).
#
#   scripts/fuzz.sh MINUTES [TARGET...]      (targets: image_decode requests prompt; default all)
#
# Prints each target's executions, exec/s, corpus and coverage, lists its crash / OOM / timeout
# artifacts (fuzz/artifacts/TARGET/) and exits non-zero if any target found one. The corpus
# grows in fuzz/corpus/TARGET (git-ignored); fuzz/seeds/TARGET is read as an extra seed corpus.
# Needs `cargo install cargo-fuzz --locked` and a C++ compiler (libfuzzer-sys).
#
# Environment: FUZZ_SANITIZER (default address; `none` is faster but disables
# -malloc_limit_mb), FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT_S per input (default 60),
# FUZZ_BUILD (default -O: release; -a adds debug assertions and overflow checks).
set -euo pipefail

# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer, sanitizer-coverage passes).
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them; it is set for this script only.
export RUSTC_BOOTSTRAP=1

minutes=${1:-}
if ! [[ $minutes =~ ^[0-9]+$ ]] || [ "$minutes" -eq 0 ]; then
    echo "usage: $0 MINUTES [TARGET...]" >&2
    exit 2
fi
shift
cd "$(dirname "$0")/../fuzz"
if [ $# -gt 0 ]; then targets=("$@"); else targets=(image_decode requests prompt); fi
sanitizer=${FUZZ_SANITIZER:-address}
rss_mb=${FUZZ_RSS_MB:-2048}
build=${FUZZ_BUILD:--O}
timeout_s=${FUZZ_TIMEOUT_S:-60}

nice -n 19 cargo fuzz build $build --sanitizer "$sanitizer"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" logs
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="logs/$t.log"
    before=$(ls "artifacts/$t" | sort)
    echo "== $t: ${minutes} min (log: fuzz/$log)"
    set +e
    # One process, one job (libFuzzer's default; -jobs/-workers would fork children).
    nice -n 19 cargo fuzz run $build --sanitizer "$sanitizer" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time=$((minutes * 60)) -rss_limit_mb="$rss_mb" -malloc_limit_mb="$rss_mb" \
        -timeout="$timeout_s" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    grep -E '^#[0-9]+[[:space:]]+(DONE|INITED)' "$log" | tail -n 1 || true
    grep -E '^Done [0-9]+ runs' "$log" || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" || true
    echo "corpus: $(ls "corpus/$t" | wc -l) inputs"
    new=$(comm -13 <(echo "$before") <(ls "artifacts/$t" | sort) | grep -E '^(crash|oom|timeout|leak)-' || true)
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        failed+=("$t")
        echo "!! $t failed (exit $rc); artifacts:"
        for a in $new; do echo "   fuzz/artifacts/$t/$a"; done
        grep -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY' "$log" | head -n 5 || true
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
echo "no crashes"
