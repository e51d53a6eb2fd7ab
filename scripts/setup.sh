#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Debian machine: system packages and the virtualenv.
# Called by `make serve` and `make test`; safe to run again, it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "setup: need root for: $*" >&2; return 1; fi; }

# Debian packages: the default data set, and the offline tools the checks use.
need_apt=()
[ -f "$FMNIST_DIR/t10k-labels-idx1-ubyte.gz" ] || need_apt+=(dataset-fashion-mnist)
# promtool lints the /metrics exposition in the tests (tests skip the check without it).
command -v promtool >/dev/null || need_apt+=(prometheus)
# The end-to-end compose test (tests/test_deploy.py): a private Docker engine and a base image.
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
# The zero-loss rolling update test (tests/test_rolling_update.py): a real load balancer.
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# Retry storms as the issues measured them: python -m bench overload --storm-client hey.
command -v hey >/dev/null || need_apt+=(hey)
# The web page's browser test (tests/test_web_ui.py): Playwright drives Debian's Chromium.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# The README's commands (tests/test_docs.py runs them against a server).
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.sepconv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first and exactly pinned: an unpinned resolve would pull a CUDA build of several GB.
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[cpu,build,test,bench,tracing,client]"
  touch "$stamp"
fi
# KServe's typed models check deploy/k8s/kserve/ (tests/k8s_schemas.py). The kserve package pins
# protobuf < 7, grpcio, pandas and more, which would change the service's own dependencies, so
# only its wheel (--no-deps) and six go into a folder of their own, off the venv's path.
KSERVE_VERSION=0.21.0
kserve_dir="$VENV/kserve-models"
if [ ! -f "$kserve_dir/kserve-$KSERVE_VERSION.dist-info/METADATA" ]; then
  rm -rf "$kserve_dir"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$kserve_dir" \
    "kserve==$KSERVE_VERSION" "six>=1.16"
fi
echo "setup: ok ($("$VENV/bin/python" -c 'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)'))"
