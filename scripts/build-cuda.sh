#!/usr/bin/env bash
# build-cuda.sh [COMPUTE_CAP] [OUT_DIR] — build the `--features cuda` janus binary and the parity
# test binary on a dev machine without a GPU, and pack them for a GPU host that has no Rust
# toolchain (see docs: shared gpu-build.md recipe; docs/devices.md "GPU build and check").
#
#   scripts/build-cuda.sh            # compute capability 90 (H100/H200), into target/cuda-dist
#   scripts/build-cuda.sh 89 /tmp/d  # L4/L40S, elsewhere
#
# Produces OUT_DIR/janus-cuda-<cap>/{janus,parity,gpu-check.sh,torch_reference.py,fixtures/janus-tiny,BUILD-INFO.txt}
# and OUT_DIR/janus-cuda-<cap>.tar.xz (must fit one 64 MiB transfer; the script fails otherwise).
#
# The CUDA 13.0 build toolchain comes from NVIDIA's PyPI wheels (pinned: the GPU hosts run driver
# 580 = CUDA 13.0; nvcc 13.5 breaks cudarc 0.19.10 and emits PTX driver 580 cannot JIT), installed
# with --no-deps into a venv under target/ on first use (~1.2 GB, ~30 s). A cold build takes
# 16–18 min on 2 cores (candle-kernels' nvcc step alone ≈ 14 min); later builds reuse the kernels
# as long as the install location, CUDA_COMPUTE_CAP and NVCC stay the same.
#
# Env knobs:
#   CUDA_WHEELS_VENV   toolchain venv           (default target/cuda-13.0-venv)
#   CUDA_TARGET_DIR    cargo target dir         (default target/cuda; kept apart from the CPU build
#                      so the two never invalidate each other's build-script outputs)
#   CARGO              cargo command            (default cargo)
#   NICE               prefix for the heavy commands (default "nice -n 19"; set NICE= to disable)
#
# Never run the results on a machine without the NVIDIA driver: the binaries link libcuda.so.1
# (candle-core forces cudarc's dynamic-linking) and exit 127 there, even for --device cpu.
set -euo pipefail

CAP="${1:-90}"
OUT_DIR="${2:-target/cuda-dist}"
case "$CAP" in
  ''|*[!0-9]*) echo "build-cuda.sh: COMPUTE_CAP must be a number like 90, got '$CAP'" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$ROOT/$OUT_DIR" ;; esac

VENV="${CUDA_WHEELS_VENV:-$ROOT/target/cuda-13.0-venv}"
TARGET_DIR="${CUDA_TARGET_DIR:-$ROOT/target/cuda}"
CARGO="${CARGO:-cargo}"
read -r -a NICE_CMD <<<"${NICE-nice -n 19}"
MAX_BYTES=$((64 * 1024 * 1024))

log() { printf '[build-cuda %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'build-cuda.sh: ERROR: %s\n' "$*" >&2; exit 1; }

for tool in python3 cc strip xz tar readelf ldd; do
  command -v "$tool" >/dev/null || die "'$tool' not found on PATH"
done
command -v "$CARGO" >/dev/null || die "'$CARGO' not found on PATH"

# ---------------------------------------------------------------- 1. toolchain (PyPI wheels)
# 13.0.x on purpose (see header). Install all of them with --no-deps: nvidia-cuda-nvcc's metadata
# asks for nvvm/runtime/crt unpinned, which would pull the 13.5 cicc.
PKGS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
)

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"

if [ ! -x "$CU/bin/nvcc" ] || [ ! -e "$CU/lib/stubs/libcuda.so" ]; then
  log "installing CUDA 13.0 wheels into $VENV (~1.2 GB)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "${PKGS[@]}"
  # The wheels carry only versioned sonames; the linker's -l flags want lib<name>.so.
  for l in cudart cublas cublasLt curand nvrtc; do
    real=""
    for f in "$CU/lib/lib$l.so."*; do
      case "$f" in *.alt.*) continue ;; esac
      [ -e "$f" ] && { real="${f##*/}"; break; }
    done
    [ -n "$real" ] || die "no lib$l.so.* in $CU/lib"
    ln -sf "$real" "$CU/lib/lib$l.so"
  done
  # Link-time stand-in for the driver library (no wheel ships libcuda): one empty function per
  # driver entry point of this toolkit's cuda.h, soname libcuda.so.1. Named libcuda.so so nothing
  # loads it by accident; the GPU host's driver provides the real libcuda.so.1. Never ship it.
  mkdir -p "$CU/lib/stubs"
  echo '#include <cuda.h>' | cc -E -I"$CU/include" -x c - \
    | grep -oP '\bcu[A-Z]\w*(?=\s*\()' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' >"$CU/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/libcuda_stub.c"
fi

# janus has no cudnn feature (candle would use cuDNN only for the VQ decoder convolutions).
FEATURES=cuda

# ---------------------------------------------------------------- 2. environment
export PATH="$CU/bin:$PATH"           # cudarc's build script runs plain `nvcc --version` from PATH
export NVCC="$CU/bin/nvcc"            # cudaforge (candle-kernels' build script) prefers $NVCC
export CUDA_ROOT="$CU"                # cudarc: link search in $CUDA_ROOT/lib and lib/stubs
export CUDA_COMPUTE_CAP="$CAP"        # no nvidia-smi here; 90 -> sm_90a
export CARGO_TARGET_DIR="$TARGET_DIR"
export JANUS_GIT_SHA="${JANUS_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
NVCC_VERSION="$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
case "$NVCC_VERSION" in
  13.0) ;;
  *) die "nvcc on PATH is '$NVCC_VERSION', need 13.0 (cudarc 0.19.10 / driver 580)" ;;
esac
log "nvcc $NVCC_VERSION, CUDA_COMPUTE_CAP=$CAP, CARGO_TARGET_DIR=$TARGET_DIR, features=$FEATURES"

# ---------------------------------------------------------------- 3. build
# Same feature as deploy/docker/Dockerfile.cuda: the root package's `cuda` = `janus-pipeline/cuda`.
start=$SECONDS
log "cargo build --release --locked --features $FEATURES --bin janus (cold: 16-18 min on 2 cores)"
"${NICE_CMD[@]}" "$CARGO" build --release --locked --features "$FEATURES" --bin janus
JANUS_EXE="$TARGET_DIR/release/janus"
[ -x "$JANUS_EXE" ] || die "no $JANUS_EXE after the build"

log "cargo test --release --locked --features $FEATURES --test pipeline --no-run"
# The parity tests are the `parity::` module of the root package's `pipeline` test harness
# (tests/pipeline/). The test executable's name carries a hash: take it from cargo's JSON messages
# (the `pipeline` test target, an artifact with an executable, built with the test profile).
PARITY_EXE="$("${NICE_CMD[@]}" "$CARGO" test --release --locked --features "$FEATURES" --test pipeline \
    --no-run --message-format=json \
  | python3 -c '
import json, sys
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if (m.get("reason") == "compiler-artifact" and t.get("name") == "pipeline"
            and "test" in t.get("kind", []) and m.get("executable")
            and (m.get("profile") or {}).get("test")):
        exe = m["executable"]
if not exe:
    sys.exit("no pipeline test executable in cargo output")
print(exe)
')"
[ -x "$PARITY_EXE" ] || die "parity test executable '$PARITY_EXE' missing"
log "built in $((SECONDS - start)) s: $JANUS_EXE, $PARITY_EXE"

# ---------------------------------------------------------------- 4. stage
NAME="janus-cuda-$CAP"
STAGE="$OUT_DIR/$NAME"
TARBALL="$OUT_DIR/$NAME.tar.xz"
rm -rf "$STAGE" "$TARBALL"
mkdir -p "$STAGE/fixtures"
cp "$JANUS_EXE" "$STAGE/janus"
cp "$PARITY_EXE" "$STAGE/parity"
strip "$STAGE/janus" "$STAGE/parity"
cp -r tests/fixtures/janus-tiny "$STAGE/fixtures/janus-tiny"
cp scripts/gpu-check.sh "$STAGE/gpu-check.sh"
cp tools/bench/torch_reference.py "$STAGE/torch_reference.py"
chmod +x "$STAGE/gpu-check.sh"

# Link pre-check (gpu-build.md §5): with the driver stand-in as libcuda.so.1 next to the wheel
# libraries, every DT_NEEDED must resolve. Missing libraries are fatal; undefined symbols are
# reported (ldd -r) but only warned about.
PRECHECK="$(mktemp -d)"
trap 'rm -rf "$PRECHECK"' EXIT
cp "$CU/lib/stubs/libcuda.so" "$PRECHECK/libcuda.so.1"
{
  echo "janus CUDA build"
  echo "git: $JANUS_GIT_SHA$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
  echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
  echo "nvcc: $NVCC_VERSION (PyPI wheels, $VENV)"
  echo "CUDA_COMPUTE_CAP: $CAP (PTX + SASS for sm_${CAP}a only: rebuild for another GPU family)"
  echo "cargo features: $FEATURES"
  for b in janus parity; do
    echo
    echo "== $b: DT_NEEDED"
    readelf -d "$STAGE/$b" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
    echo "== $b: ldd -r (stand-in libcuda, wheel libs)"
    LD_LIBRARY_PATH="$PRECHECK:$CU/lib" ldd -r "$STAGE/$b" 2>&1 | sed 's/^/  /'
  done
  echo
  echo "On the GPU host: tar -xJf $NAME.tar.xz && cd $NAME && ./gpu-check.sh --device cuda:0"
} >"$STAGE/BUILD-INFO.txt"
if grep -q 'not found' "$STAGE/BUILD-INFO.txt"; then
  grep 'not found' "$STAGE/BUILD-INFO.txt" >&2
  die "a shared library of the CUDA build does not resolve even against the wheels (see $STAGE/BUILD-INFO.txt)"
fi
if grep -q 'undefined symbol' "$STAGE/BUILD-INFO.txt"; then
  log "WARNING: ldd -r reports undefined symbols, see $STAGE/BUILD-INFO.txt"
fi

# ---------------------------------------------------------------- 5. pack
log "packing $TARBALL"
tar -C "$OUT_DIR" -cf - "$NAME" | "${NICE_CMD[@]}" xz -T0 -6 >"$TARBALL"
SIZE="$(stat -c %s "$TARBALL")"
ls -l "$STAGE"/janus "$STAGE"/parity >&2
awk -v f="$TARBALL" -v s="$SIZE" 'BEGIN { printf "%s: %d bytes (%.1f MiB; limit 64 MiB)\n", f, s, s / 1048576 }'
if [ "$SIZE" -gt "$MAX_BYTES" ]; then
  die "$TARBALL is $SIZE bytes, over the 64 MiB ($MAX_BYTES) that one transfer carries"
fi
echo "unpack on the GPU host: tar -xJf $NAME.tar.xz && cd $NAME && ./gpu-check.sh --device cuda:0"
