#!/bin/sh
# Entry point of the model-builder container: build a model into $SEPCONV_MODEL_DIR (a named
# volume) unless one is already there, so `docker compose up` trains once and restarts are instant.
# Files are written to a scratch directory first and model.onnx is moved in last, so the API can
# never see a half-written model.
set -eu
out=${SEPCONV_MODEL_DIR:-/models}
recipe=${SEPCONV_RECIPE:-quick}

if [ -s "$out/model.onnx" ]; then
  echo "build-model: $out/model.onnx exists; not rebuilding (remove the volume to rebuild)"
  exit 0
fi
scratch=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
echo "build-model: building recipe '$recipe' into $out"
# shellcheck disable=SC2086  # SEPCONV_BUILD_ARGS is a list of extra CLI flags
python -m model build --recipe "$recipe" --out "$scratch" ${SEPCONV_BUILD_ARGS:-}
for f in "$scratch"/*; do
  [ "$(basename "$f")" = model.onnx ] || mv "$f" "$out/"
done
mv "$scratch/model.onnx" "$out/model.onnx"
echo "build-model: wrote $out/model.onnx"
