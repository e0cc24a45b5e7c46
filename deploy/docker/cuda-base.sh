#!/usr/bin/env bash
# The CUDA image without NVIDIA's container images (opt-in part of deploy/docker/check.sh:
# JANUS_DOCKER_CUDA_BASE=1; never in CI: ~700 MB of wheels, ~1.1 GB of image).
#
#   deploy/docker/cuda-base.sh                                   # the runtime base only
#   JANUS_CUDA_BIN_DIR=DIR deploy/docker/cuda-base.sh            # + Dockerfile.cuda on it
#
# 1. Assembles the runtime base `localhost/janus-cuda-runtime:13.0-bookworm` the way
#    scripts/build-cuda.sh assembles its toolchain: NVIDIA's CUDA 13.0 PyPI wheels (same pins,
#    --no-deps; only the runtime libraries cudart, cuBLAS/cuBLASLt, cuRAND, NVRTC) copied into
#    debian:bookworm-slim (the base deploy/docker/check.sh makes) under /usr/local/cuda/lib64, on
#    the loader's path, with the NVIDIA container runtime's variables. Checks that every library
#    resolves its own dependencies in the image and that the sonames a `--features cuda` janus
#    needs (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10) are in ldconfig's
#    cache. Reuses scripts/build-cuda.sh's venv (target/cuda-13.0-venv) when it exists.
# 2. With JANUS_CUDA_BIN_DIR (a directory holding janus, janus-understanding, janus-generation
#    and janus-gateway built with --features janus-pipeline/cuda; docs/deploy.md says how):
#    builds deploy/docker/Dockerfile.cuda on that base (JANUS_BINARIES=prebuilt,
#    CUDA_RUNTIME_IMAGE=the base) as localhost/janus:check-cuda and checks that ldd resolves
#    everything but the driver's libcuda.so.1 and that `janus --version` starts with a link
#    stand-in for libcuda.so.1 (functions that do nothing, generated from the binary's undefined
#    cu* symbols; never shipped). Serving needs a GPU node and the NVIDIA container runtime.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${JANUS_DOCKER_CHECK_DIR:-$repo/target/docker-check}"
base_image="${JANUS_CUDA_RUNTIME_IMAGE:-localhost/janus-cuda-runtime:13.0-bookworm}"
cuda_image="${JANUS_DOCKER_CUDA_IMAGE:-localhost/janus:check-cuda}"
debian="docker.io/library/debian:bookworm-slim"
mkdir -p "$work"
if [ -z "${CONTAINERS_CONF:-}" ]; then
  printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
  export CONTAINERS_CONF="$work/containers.conf"
fi
podman=(podman --runtime runc)
say() { printf '== %s\n' "$*"; }
die() { printf 'cuda-base.sh: ERROR: %s\n' "$*" >&2; exit 1; }

"${podman[@]}" image exists "$debian" || die "$debian missing: run deploy/docker/check.sh first (it makes it)"

# ------------------------------------------------------------------ 1. runtime base from wheels
# The runtime subset of scripts/build-cuda.sh's PKGS, same versions (CUDA 13.0 = driver >= 580).
PKGS=(nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14)
find_cu() {
  local py="$1/bin/python"
  [ -x "$py" ] || return 1
  local site
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [ -e "$site/nvidia/cu13/lib/libcublas.so.13" ] || return 1
  echo "$site/nvidia/cu13"
}
CU="$(find_cu "${CUDA_WHEELS_VENV:-$repo/target/cuda-13.0-venv}" || true)"
if [ -z "$CU" ]; then
  venv="$work/cuda-runtime-venv"
  if ! CU="$(find_cu "$venv")"; then
    say "installing the CUDA 13.0 runtime wheels into $venv (~700 MB)"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "${PKGS[@]}"
    CU="$(find_cu "$venv")" || die "no libcublas.so.13 after installing ${PKGS[*]}"
  fi
fi
say "CUDA libraries from $CU/lib"

if ! "${podman[@]}" image exists "$base_image"; then
  ctx="$work/cuda-base-ctx"
  rm -rf "$ctx"
  mkdir -p "$ctx/lib"
  # Versioned sonames only (build-cuda.sh adds unversioned link-time names and a driver stand-in
  # under stubs/: neither belongs in a runtime image).
  for f in "$CU"/lib/lib*.so.*; do
    # libnvvm comes with the toolchain venv's nvidia-nvvm wheel (nvcc's back end), not with the
    # runtime wheels: 63 MB no binary loads.
    case "${f##*/}" in *.alt.* | libnvvm.*) continue ;; esac
    cp -L "$f" "$ctx/lib/"
  done
  cat >"$ctx/Containerfile" <<EOF
FROM $debian
COPY lib/ /usr/local/cuda/lib64/
RUN echo /usr/local/cuda/lib64 >/etc/ld.so.conf.d/000-cuda.conf && ldconfig
# What nvidia/cuda:*-runtime sets: the container toolkit mounts the driver (libcuda.so.1) and
# the GPUs into containers that ask for them.
ENV CUDA_VERSION=13.0 \\
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \\
    NVIDIA_VISIBLE_DEVICES=all \\
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \\
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64
LABEL org.opencontainers.image.description="CUDA 13.0 runtime libraries from NVIDIA's PyPI wheels ($(IFS=' '; echo "${PKGS[*]}")) on debian:bookworm-slim"
EOF
  say "podman build $base_image"
  t=$SECONDS
  "${podman[@]}" build --pull=never -t "$base_image" "$ctx" >"$work/cuda-base-build.log" 2>&1 \
    || { tail -20 "$work/cuda-base-build.log"; exit 1; }
  echo "built $base_image in $((SECONDS - t)) s"
  rm -rf "$ctx"
fi
echo "$base_image: $(( $("${podman[@]}" image inspect --format '{{.Size}}' "$base_image") / 1000000 )) MB"
out="$("${podman[@]}" run --rm --pull=never --network none "$base_image" sh -c '
  for f in /usr/local/cuda/lib64/*.so.*; do echo "@@ $f"; ldd "$f"; done
  echo "@@ ldconfig"; ldconfig -p')"
missing="$(printf '%s\n' "$out" | awk '/^@@/ {f=$2} /not found/ {print f ": " $1}')"
[ -z "$missing" ] || die "unresolved libraries in $base_image:
$missing"
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  printf '%s\n' "$out" | grep -q "^[[:space:]]*$so " || die "$so not in $base_image's ldconfig cache"
done
echo "ok   $base_image: every library resolves; libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 on the loader path"

# ------------------------------------------------------------------ 2. Dockerfile.cuda on it
[ -n "${JANUS_CUDA_BIN_DIR:-}" ] || { echo "(JANUS_CUDA_BIN_DIR unset: Dockerfile.cuda not built)"; exit 0; }
stage="$work/cuda-bin"
rm -rf "$stage"
mkdir -p "$stage"
for b in janus janus-understanding janus-generation janus-gateway; do
  [ -x "$JANUS_CUDA_BIN_DIR/$b" ] || die "$JANUS_CUDA_BIN_DIR/$b missing"
  cp "$JANUS_CUDA_BIN_DIR/$b" "$stage/$b"
done
is_cuda=1
readelf -d "$stage/janus" | grep -q 'NEEDED.*\[libcuda\.so\.1\]' || is_cuda=0
[ "$is_cuda" = 1 ] || echo "note: $JANUS_CUDA_BIN_DIR/janus does not link libcuda.so.1 (not a --features cuda build): checking the Dockerfile.cuda path only"
say "podman build -f deploy/docker/Dockerfile.cuda --build-arg JANUS_BINARIES=prebuilt --build-arg CUDA_RUNTIME_IMAGE=$base_image -t $cuda_image"
t=$SECONDS
"${podman[@]}" build --network host --pull=never \
  -f "$repo/deploy/docker/Dockerfile.cuda" --ignorefile "$repo/deploy/docker/Dockerfile.cuda.dockerignore" \
  --build-arg JANUS_BINARIES=prebuilt --build-context "janus-bin=$stage" \
  --build-arg CUDA_RUNTIME_IMAGE="$base_image" --label janus-docker-check=1 -t "$cuda_image" "$repo" \
  >"$work/cuda-build.log" 2>&1 || { tail -40 "$work/cuda-build.log"; exit 1; }
"${podman[@]}" image prune -f --filter label=janus-docker-check=1 >/dev/null 2>&1 || true
echo "built $cuda_image in $((SECONDS - t)) s: $(( $("${podman[@]}" image inspect --format '{{.Size}}' "$cuda_image") / 1000000 )) MB"
out="$("${podman[@]}" run --rm --pull=never --network none --entrypoint '["/bin/sh","-c"]' "$cuda_image" \
  'for b in /usr/local/bin/*; do echo "@@ $b"; ldd "$b"; done')"
missing="$(printf '%s\n' "$out" | awk '/^@@/ {f=$2} /not found/ {print f ": " $1}' | grep -v ': libcuda\.so\.1$' || true)"
[ -z "$missing" ] || die "unresolved libraries in $cuda_image besides the driver's libcuda.so.1:
$missing"
echo "ok   ldd in $cuda_image: everything resolves but the driver's libcuda.so.1"
stub=()
if [ "$is_cuda" = 1 ]; then
  nm -D --undefined-only "$stage/janus" | awk '$2 ~ /^cu[A-Z]/ {sub(/@.*/, "", $2); print "void " $2 "(void) {}"}' | sort -u >"$work/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so.1" "$work/libcuda_stub.c"
  stub=(-v "$work/libcuda.so.1:/usr/local/nvidia/lib64/libcuda.so.1:ro")
fi
version="$("${podman[@]}" run --rm --pull=never --network none "${stub[@]}" "$cuda_image" janus --version)"
echo "ok   $cuda_image: janus --version -> $version$([ "$is_cuda" = 1 ] && echo ' (with the libcuda.so.1 stand-in)')"
