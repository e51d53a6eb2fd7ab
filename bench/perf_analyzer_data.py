"""Input data files for Triton's perf_analyzer (``--input-data FILE``), from real images.

    python -m bench.perf_analyzer_data --model artifacts/model.onnx --image a.png b.jpg > in.json
    python -m bench.perf_analyzer_data --model artifacts/model.onnx --tensor a.png > in.json

``--image``: each file as the ``image`` input (BYTES). perf_analyzer sends a BYTES tensor's
``b64`` data as it is, so each element is base64 of the serialised form: a 4-byte little-endian
length, then the file. ``--tensor``: each file preprocessed here exactly as the server would
(``sepconv.preprocess``, the model's own metadata), as the model's FP32 input, one row of
``[C, H, W]`` flattened. One ``data`` entry per file; perf_analyzer cycles through them.

The other input is left out: the server takes exactly one, and the model configuration marks
both ``optional``, which tells perf_analyzer not to ask for it.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from sepconv.preprocess import preprocess_bytes
from sepconv.spec import ModelSpec, read_spec
from service.protocols.oip import IMAGE_INPUT, serialize_bytes


def image_entry(blob: bytes) -> dict:
    return {IMAGE_INPUT: {"b64": base64.b64encode(serialize_bytes([blob])).decode()}}


def tensor_entry(blob: bytes, spec: ModelSpec, max_pixels: int = 40_000_000) -> dict:
    row = preprocess_bytes(blob, spec, max_pixels=max_pixels)
    return {spec.input_name: {"content": [float(v) for v in row.ravel()], "shape": list(row.shape)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the served ONNX model")
    kind = ap.add_mutually_exclusive_group(required=True)
    kind.add_argument("--image", type=Path, nargs="+", help="send the files as encoded images")
    kind.add_argument("--tensor", type=Path, nargs="+", help="send the files preprocessed")
    args = ap.parse_args(argv)
    spec = read_spec(str(args.model))
    if args.image:
        data = [image_entry(path.read_bytes()) for path in args.image]
    else:
        data = [tensor_entry(path.read_bytes(), spec) for path in args.tensor]
    json.dump({"data": data}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
