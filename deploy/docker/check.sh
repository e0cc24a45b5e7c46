#!/usr/bin/env bash
# Build the CPU image from deploy/docker/Dockerfile with podman and run it the way the Helm chart
# runs it: gateway, understanding and generation as three containers configured by the chart's
# rendered pod specs (env, ports, user, read-only root, volumes, probes, grace periods), the tiny
# checkpoint mounted read-only where the chart mounts the model. Then, through the gateway:
# health, an understanding request with an image, a generation request (PNG), the HTTP port,
# every pod's metrics; SIGTERM drains (exit 0 within the grace period); and the chart's values,
# args and probes are checked against what the image provides. See docs/deploy.md, "Checking the
# images".
#
#   deploy/docker/check.sh        (after `cargo build --release --workspace --bins`)
#
# Installs Debian's podman, runc and debootstrap when missing (apt). No registry is needed: the
# runtime stage's base `debian:bookworm-slim` is made with debootstrap (cached as a tarball under
# target/docker-check/ and as the podman image), and the image takes the four binaries built on
# this host (Debian bookworm, the runtime image's glibc) through the Dockerfile's `prebuilt`
# stage (JANUS_BINARIES=prebuilt) instead of compiling them again in a rust image. The runtime
# stage's `apt-get install ca-certificates` runs against Debian's mirrors (`--network host`).
# Rendering the chart uses deploy/helm/check.sh's virtualenv (created when missing).
#
# Env knobs:
#   JANUS_BIN_DIR           where the four binaries are (default target/release; built with cargo
#                           when missing there)
#   JANUS_DOCKER_IMAGE      tag to build (default localhost/janus:check)
#   JANUS_DOCKER_CHECK_DIR  cache and outputs (default target/docker-check)
#   JANUS_DEBIAN_MIRROR     debootstrap mirror (default http://deb.debian.org/debian)
#   JANUS_DEPLOY_VENV       the chart check's venv (default target/deploy-venv)
#   JANUS_DOCKER_CUDA_BASE  1 = also assemble the CUDA runtime base from NVIDIA's PyPI wheels
#                           (the libraries scripts/build-cuda.sh uses; ~700 MB download once) and
#                           check it; with JANUS_CUDA_BIN_DIR (four `--features cuda` binaries) also
#                           build Dockerfile.cuda on it. Off by default and in CI.
#
# Exit status 0 when every check passes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
work="${JANUS_DOCKER_CHECK_DIR:-$repo/target/docker-check}"
image="${JANUS_DOCKER_IMAGE:-localhost/janus:check}"
bins="${JANUS_BIN_DIR:-$repo/target/release}"
venv="${JANUS_DEPLOY_VENV:-$repo/target/deploy-venv}"
mirror="${JANUS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base="docker.io/library/debian:bookworm-slim"
label="janus-docker-check=1"
binaries=(janus janus-understanding janus-generation janus-gateway)
mkdir -p "$work"
t_all=$SECONDS

say() { printf '== %s\n' "$*"; }

# ------------------------------------------------------------------ 0. tools
t=$SECONDS
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian's podman, runc, debootstrap (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi
# crun (podman's default runtime) cannot start containers here (cgroups v1 in a VM); runc can.
# Podman's default ulimits cannot be set here (setrlimit: Operation not permitted).
printf '[containers]\ndefault_ulimits = []\n' >"$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
podman=(podman --runtime runc)

cleanup() {
  local ids
  ids="$("${podman[@]}" ps -aq --filter "label=$label" 2>/dev/null || true)"
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    "${podman[@]}" rm -f -t 0 $ids >/dev/null 2>&1 || true
  fi
  "${podman[@]}" network rm -f janus-check >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

if ! "$venv/bin/python" -c 'import helm_python, yaml' 2>/dev/null; then
  say "virtualenv $venv (deploy/helm/check.sh's pins)"
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "helm-python-sdk==0.2.2" "PyYAML>=6"
fi

tools_s=$((SECONDS - t))

# ------------------------------------------------------------------ 1. base image (debootstrap)
t=$SECONDS
# Made the way Docker's debian:bookworm-slim is (debuerreotype --slimify: no docs, man pages,
# locales; apt keeps no .debs or lists), with the same apt sources (bookworm, -updates, -security).
if ! "${podman[@]}" image exists "$base"; then
  tarball="$work/debian-bookworm-slim.tar"
  if [ ! -s "$tarball" ]; then
    say "debootstrap --variant=minbase bookworm ($mirror)"
    t=$SECONDS
    rootfs="$work/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log"; exit 1; }
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/{groff,info,linda,locale,man}/* "$rootfs"/usr/share/lintian/overrides/*
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    rm -f "$rootfs"/var/log/*.log "$rootfs/etc/hostname"
    : >"$rootfs/etc/resolv.conf"
    : >"$rootfs/etc/machine-id"
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    echo "debootstrap + slim: $((SECONDS - t)) s, $(du -m "$tarball" | cut -f1) MB tarball"
  fi
  say "podman import $tarball as $base"
  "${podman[@]}" import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase bookworm, slimmed" \
    "$tarball" "$base" >/dev/null
fi

base_s=$((SECONDS - t))

# ------------------------------------------------------------------ 2. the image
for b in "${binaries[@]}"; do
  if [ ! -x "$bins/$b" ]; then
    [ -z "${JANUS_BIN_DIR:-}" ] || { echo "$bins/$b missing"; exit 1; }
    say "cargo build --release (missing $bins/$b)"
    (cd "$repo" && cargo build --release --locked -p janus -p janus-understanding -p janus-generation -p janus-gateway)
    break
  fi
done
stage="$work/bin"
rm -rf "$stage"
mkdir -p "$stage"
for b in "${binaries[@]}"; do cp "$bins/$b" "$stage/$b"; done
old_id="$("${podman[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
say "podman build -f deploy/docker/Dockerfile --build-arg JANUS_BINARIES=prebuilt -t $image"
t=$SECONDS
if ! "${podman[@]}" build --network host --pull=never \
    -f "$repo/deploy/docker/Dockerfile" --ignorefile "$repo/deploy/docker/Dockerfile.dockerignore" \
    --build-arg JANUS_BINARIES=prebuilt --build-context "janus-bin=$stage" \
    --build-arg JANUS_GIT_SHA="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --label "$label" -t "$image" "$repo" >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log"
  exit 1
fi
build_s=$((SECONDS - t))
new_id="$("${podman[@]}" image inspect --format '{{.Id}}' "$image")"
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  "${podman[@]}" rmi "$old_id" >/dev/null 2>&1 || true   # the previous run's image, now untagged
fi
# Untagged leftovers of this script's builds (the `prebuilt` stages of earlier binaries).
"${podman[@]}" image prune -f --filter "label=$label" >/dev/null 2>&1 || true
size="$("${podman[@]}" image inspect --format '{{.Size}}' "$image")"
base_size="$("${podman[@]}" image inspect --format '{{.Size}}' "$base")"
cached="$(grep -c '^--> Using cache' "$work/build.log" || true)"
echo "built $image in ${build_s} s ($cached cached steps): $((size / 1000000)) MB" \
  "(base $base $((base_size / 1000000)) MB, binaries $(du -cm "$stage"/* | tail -1 | cut -f1) MB)"

# ------------------------------------------------------------------ 3. run it as the chart does
say "running the chart's three pods from $image"
t=$SECONDS
"$venv/bin/python" "$here/check_run.py" --image "$image" --janus "$bins/janus" \
  --podman "${podman[*]}" --out "$work/out"
run_s=$((SECONDS - t))

# ------------------------------------------------------------------ 4. CUDA (opt-in)
if [ "${JANUS_DOCKER_CUDA_BASE:-0}" = 1 ]; then
  bash "$here/cuda-base.sh"
fi
echo "deploy/docker/check.sh: all checks passed in $((SECONDS - t_all)) s" \
  "(tools ${tools_s} s, base image ${base_s} s, image build ${build_s} s, pods ${run_s} s)"
