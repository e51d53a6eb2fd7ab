#!/bin/sh
# Entry point of the model-builder image (docker compose, the Kubernetes Job and initContainer):
# build a model unless it is already there, so `docker compose up` trains once and restarts are
# instant. Where it goes:
#   SEPCONV_MODEL_REPOSITORY=DIR  a model repository, what the server's setting of that name
#                                 serves: DIR/$SEPCONV_BUILD_NAME/<version>/model.onnx (name
#                                 default fashion-mnist). SEPCONV_BUILD_VERSION unset: version 1,
#                                 only when the model has no version yet; N: version N unless it
#                                 exists; `next`: one above the highest, a new version each run.
#   SEPCONV_MODEL_DIR=DIR         otherwise: DIR/model.onnx (SEPCONV_MODEL_PATH), unless it exists.
# The build writes into a hidden scratch folder beside the target (skipped by the server's scan)
# and model.onnx is moved in last, so a server, polling or not, never sees a half-written model.
# Started as root (compose does, on a bind-mounted host folder), it builds as the owner of the
# folder, so the files on the host belong to the user who owns it rather than to root.
set -eu
recipe=${SEPCONV_RECIPE:-quick}
repository=${SEPCONV_MODEL_REPOSITORY:-}
top=${repository:-${SEPCONV_MODEL_DIR:-/models}}

[ -d "$top" ] || { echo "build-model: $top is not a folder (mount one there)" >&2; exit 2; }
if [ "$(id -u)" = 0 ]; then
  owner=$(stat -c %u "$top")
  group=$(stat -c %g "$top")
  if [ "$owner" != 0 ]; then
    echo "build-model: building as uid $owner, gid $group (the owner of $top)"
    # The uid may have no passwd entry: getpass.getuser() (torch's cache folders) reads USER first.
    export HOME=/tmp USER="$owner" LOGNAME="$owner"
    exec setpriv --reuid "$owner" --regid "$group" --clear-groups -- "$0" "$@"
  fi
fi

set --
if [ -n "$repository" ]; then
  name=${SEPCONV_BUILD_NAME:-fashion-mnist}
  if ! printf '%s\n' "$name" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9._-]*'; then
    echo "build-model: SEPCONV_BUILD_NAME '$name' is not a model name (letters, digits, . _ -)" >&2
    exit 2
  fi
  highest=$(find "$repository/$name" -mindepth 2 -maxdepth 2 -name model.onnx 2>/dev/null \
    | sed -n 's|.*/\([0-9][0-9]*\)/model\.onnx$|\1|p' | sort -n | tail -n 1)
  version=${SEPCONV_BUILD_VERSION:-}
  case $version in
    "")
      if [ -n "$highest" ]; then
        echo "build-model: $repository/$name has version $highest; not building" \
          "(SEPCONV_BUILD_VERSION=next builds a new version)"
        exit 0
      fi
      version=1 ;;
    next) version=$(( ${highest:-0} + 1 )) ;;
    *[!0-9]*) echo "build-model: SEPCONV_BUILD_VERSION '$version' is not a number or next" >&2
      exit 2 ;;
  esac
  out=$repository/$name/$version
  scratch_in=$repository/$name
  # The model's own metadata names it as the repository serves it.
  set -- --name "$name" --version "$version"
else
  out=$top
  scratch_in=$top
fi

if [ -s "$out/model.onnx" ]; then
  echo "build-model: $out/model.onnx exists; not rebuilding (remove it to rebuild)"
  exit 0
fi
mkdir -p "$scratch_in"
scratch=$(mktemp -d "$scratch_in/.build.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
echo "build-model: building recipe '$recipe' into $out"
# shellcheck disable=SC2086  # SEPCONV_BUILD_ARGS is a list of extra CLI flags, after ours: they win
python -m model build --recipe "$recipe" --out "$scratch" "$@" ${SEPCONV_BUILD_ARGS:-}
mkdir -p "$out"
for f in "$scratch"/*; do
  [ "$(basename "$f")" = model.onnx ] || mv "$f" "$out/"
done
mv "$scratch/model.onnx" "$out/model.onnx"
echo "build-model: wrote $out/model.onnx"
