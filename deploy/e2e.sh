#!/usr/bin/env bash
# End-to-end check of the compose stack, on a machine that reaches no image registry:
#   1. start a private Docker engine (deploy/scripts/dockerd.sh: no bridge, no iptables);
#   2. build the stand-in base images: debootstrap bookworm + Python 3.11 for python:3.11-slim-bookworm
#      (deploy/scripts/base-image.sh), Debian's prometheus on it for prom/prometheus;
#   3. build the API and model-builder images from ./Dockerfile, as docker-compose.yml names them;
#   4. `docker-compose up` model-builder (smoke recipe) -> api -> prometheus, host networking only
#      (deploy/compose.e2e.yml), the model repository a fresh folder owned by a non-root uid
#      (a host user's checkout): the builder must write version 1 there as that uid;
#   5. deploy/e2e_check.py: classify through the container, shed load, query the containerised
#      Prometheus for the latency histogram, and evaluate every dashboard panel's PromQL; then
#      roll out version 2 under traffic (put in the folder, loaded through the API) and back
#      (removed, found by polling), with no failed request;
#   6. check the API runs as non-root and stops cleanly on SIGTERM;
#   7. tear everything down (compose down -v, stop dockerd), also on failure.
# Grafana is not run: its image cannot be fetched here, and Debian does not package it.
#
# Caches (debootstrap tarball, Docker layers) live in $SEPCONV_E2E_CACHE, default
# ~/.cache/sepconv-serve/e2e, outside the checkout so that fresh clones (CI) reuse them.
# Writes timings and image sizes as JSON to $E2E_REPORT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

export SEPCONV_E2E_CACHE=${SEPCONV_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sepconv-serve/e2e}
DOCKER=/usr/bin/docker   # Debian's CLI: it drives the engine's built-in BuildKit without buildx
export DOCKER
COMPOSE=${COMPOSE:-$repo/.venv/bin/docker-compose}
PYTHON=${PYTHON:-$repo/.venv/bin/python}
BASE_TAG=sepconv/python-standin:3.11-slim-bookworm
PROM_TAG=prom/prometheus:v2.55.1   # the tag docker-compose.yml uses; here, the stand-in
API_TAG=sepconv-serve/api:latest
BUILDER_TAG=sepconv-serve/model-builder:latest
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}
PROJECT=sepconv-e2e
MODEL=fashion-mnist        # docker-compose.yml's SEPCONV_BUILD_NAME
HOST_UID=12345             # owns the repository folder: neither root nor the API's uid 10001

# One run at a time per cache: two engines on one data root would corrupt it, and the ports are
# fixed. A second run waits for the first.
mkdir -p "$SEPCONV_E2E_CACHE"
exec 9>"$SEPCONV_E2E_CACHE/lock"
flock 9

# A short path: unix socket paths are limited to 108 bytes.
run_dir=$(mktemp -d /tmp/sepconv-e2e.XXXXXX)
timings=()
t0=$(date +%s)
stamp() { local now; now=$(date +%s); timings+=("\"$1\": $((now - t_step))"); t_step=$now; }
t_step=$t0

compose() {
  "$COMPOSE" -p "$PROJECT" -f docker-compose.yml -f deploy/compose.e2e.yml "$@"
}

cleanup() {
  local rc=$?
  set +e
  if [ -S "$run_dir/docker.sock" ]; then
    if [ $rc -ne 0 ]; then
      echo "e2e: FAILED (rc=$rc); container logs:" >&2
      compose logs --no-color --tail 60 >&2 2>&1
    fi
    compose down -v --remove-orphans >/dev/null 2>&1
  fi
  deploy/scripts/dockerd.sh stop "$run_dir"
  if [ $rc -ne 0 ] && [ -f "$run_dir/dockerd.log" ]; then tail -n 20 "$run_dir/dockerd.log" >&2; fi
  rm -rf "$run_dir"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "e2e: starting a private dockerd (run dir $run_dir)"
DOCKER_HOST=$(deploy/scripts/dockerd.sh start "$run_dir" "$SEPCONV_E2E_CACHE/docker")
export DOCKER_HOST
stamp dockerd_start_s

echo "e2e: base image"
deploy/scripts/base-image.sh "$BASE_TAG"
stamp base_image_s

build() {  # build TAG TARGET-or-- DOCKERFILE [ARGS...]
  local tag=$1 target=$2 file=$3; shift 3
  local args=(--network host --tag "$tag" --file "$file")
  [ "$target" = -- ] || args+=(--target "$target")
  echo "e2e: docker build $tag"
  DOCKER_BUILDKIT=1 "$DOCKER" build --progress plain "${args[@]}" "$@" . \
    > "$run_dir/build-${tag//[\/:]/_}.log" 2>&1 \
    || { tail -n 40 "$run_dir/build-${tag//[\/:]/_}.log" >&2; return 1; }
}
build "$PROM_TAG" -- deploy/standin/prometheus.Dockerfile --build-arg "BASE_IMAGE=$BASE_TAG"
stamp prometheus_image_s

# The torch wheel travels in the build context (./wheels is git-ignored); a hard link costs nothing.
if [ -n "$TORCH_WHEEL" ] && [ ! -e "wheels/$(basename "$TORCH_WHEEL")" ]; then
  ln "$TORCH_WHEEL" wheels/ 2>/dev/null || cp "$TORCH_WHEEL" wheels/
fi
secret=()
[ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca_bundle,src=$CA_BUNDLE")
build "$API_TAG" runtime-cpu Dockerfile --build-arg "PYTHON_IMAGE=$BASE_TAG" "${secret[@]}"
stamp api_image_s
build "$BUILDER_TAG" model-builder Dockerfile --build-arg "PYTHON_IMAGE=$BASE_TAG" "${secret[@]}"
stamp builder_image_s

# The slim image really has no torch (the Dockerfile also asserts this at build time).
if "$DOCKER" run --rm --network none --entrypoint python "$API_TAG" -c "import torch" 2>/dev/null; then
  echo "e2e: torch is importable in $API_TAG" >&2; exit 1
fi

# The repository compose mounts (SEPCONV_MODELS_DIR, ./models by default), outside the checkout
# so that a user's models there are neither used nor touched.
models_dir="$run_dir/models"
mkdir -m 755 "$models_dir"
chown "$HOST_UID:$HOST_UID" "$models_dir"
export SEPCONV_MODELS_DIR=$models_dir

echo "e2e: docker-compose up (model-builder -> api, prometheus)"
compose up -d --no-build model-builder api prometheus
# Nothing may have created a network: host networking only (bridge/host/none are built in).
extra_networks=$("$DOCKER" network ls --format '{{.Name}}' | grep -v -x -E 'host|none|bridge' || true)
if [ -n "$extra_networks" ]; then echo "e2e: unexpected networks: $extra_networks" >&2; exit 1; fi
stamp compose_up_s

api_id=$(compose ps -q api)
echo "e2e: waiting for the api container's HEALTHCHECK (readyz)"
for _ in $(seq 1 120); do
  health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$api_id")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { echo "e2e: api never became healthy ($health)" >&2; exit 1; }
stamp api_healthy_s

built="$models_dir/$MODEL/1/model.onnx"
[ -s "$built" ] || { echo "e2e: the builder wrote no $built" >&2; exit 1; }
owner=$(stat -c %u "$built")
[ "$owner" = "$HOST_UID" ] \
  || { echo "e2e: $built belongs to uid $owner, not to the folder's owner $HOST_UID" >&2; exit 1; }

api_uid=$("$DOCKER" exec "$api_id" id -u)
[ "$api_uid" != 0 ] || { echo "e2e: the api runs as root" >&2; exit 1; }
# The API serves (both workers, shared metrics) with a read-only root: only /tmp is writable.
if "$DOCKER" exec "$api_id" python -c "open('/app/probe', 'w')" 2>/dev/null; then
  echo "e2e: the api's root filesystem is writable (compose.e2e.yml sets read_only)" >&2; exit 1
fi
"$DOCKER" exec "$api_id" python -c "import tempfile; tempfile.TemporaryFile()" \
  || { echo "e2e: /tmp is not writable in the api container" >&2; exit 1; }

"$PYTHON" deploy/e2e_check.py --api http://127.0.0.1:18000 --prometheus http://127.0.0.1:19090 \
  --grpc 127.0.0.1:18002 --dashboard deploy/grafana/dashboards/sepconv.json --k8s deploy/k8s \
  --repository "$models_dir" --model "$MODEL" --out "$run_dir/check.json"
stamp checks_s

# SIGTERM must reach uvicorn through tini: a graceful shutdown well within the grace period, not
# a SIGKILL (137). uvicorn re-raises the signal after its shutdown, so 143 (128 + SIGTERM) or 0.
stop_start=$(date +%s)
compose stop -t 20 api >/dev/null 2>&1
stop_s=$(( $(date +%s) - stop_start ))
exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$api_id")
# Logs into a variable first: under pipefail, `docker logs | grep -q` fails at random when grep
# exits on the first match while docker is still writing (SIGPIPE).
api_logs=$("$DOCKER" logs "$api_id" 2>&1)
# compose.e2e.yml sets a 2 s drain: the stop takes at least that, then both workers shut down.
shutdowns=$(grep -c "Application shutdown complete" <<<"$api_logs" || true)
if { [ "$exit_code" != 0 ] && [ "$exit_code" != 143 ]; } || [ "$stop_s" -ge 15 ] \
   || [ "$stop_s" -lt 2 ] || [ "$shutdowns" != 2 ] \
   || [[ "$api_logs" != *"SIGTERM: draining for 2.0 s"* ]]; then
  echo "e2e: api did not drain and shut down on SIGTERM (exit $exit_code after ${stop_s}s," \
    "$shutdowns worker shutdowns)" >&2
  exit 1
fi
echo "e2e: api shut down gracefully on SIGTERM in ${stop_s}s (exit $exit_code)"

size() { "$DOCKER" image inspect -f '{{.Size}}' "$1"; }
total=$(( $(date +%s) - t0 ))
report=$(cat <<JSON
{
  "total_s": $total,
  $(IFS=,; echo "${timings[*]}"),
  "api_stop_s": $stop_s,
  "api_stop_exit_code": $exit_code,
  "api_uid": $api_uid,
  "image_bytes": {
    "$BASE_TAG": $(size "$BASE_TAG"),
    "$API_TAG": $(size "$API_TAG"),
    "$BUILDER_TAG": $(size "$BUILDER_TAG"),
    "$PROM_TAG (stand-in)": $(size "$PROM_TAG")
  },
  "checks": $(cat "$run_dir/check.json")
}
JSON
)
echo "$report"
[ -z "${E2E_REPORT:-}" ] || echo "$report" > "$E2E_REPORT"
echo "e2e: OK in ${total}s"
