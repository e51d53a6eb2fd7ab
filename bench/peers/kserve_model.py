"""KServe's Python model server with a custom ``kserve.Model`` around ONNX Runtime.

Written the way KServe's own custom-model example (``python/custom_model/model.py``) is:
``load`` creates the session, ``predict`` turns the request into a tensor, runs it and builds
the response, and ``kserve.ModelServer().start([model])`` serves it with KServe's defaults
(one uvicorn worker, gRPC on, per-request latency logging on). The preprocessing is the
project's own, so only the serving stack differs from sepconv-serve.

Requests, as KServe documents them for images:

- OIP v2, ``POST /v2/models/{name}/infer``: one BYTES input holding the encoded images as
  base64 strings in JSON, as KServe's REST examples send them (raw bytes over gRPC). The binary
  tensor extension is no way round the base64: KServe 0.21's REST decoder turns binary BYTES
  back into JSON strings and answers 500 for any element that is not UTF-8, so for an image.
  A requested output with ``parameters.classification: k`` gets Triton's ``"score:index:label"``
  strings, top k per image (the same contract sepconv-serve's OIP endpoint keeps); without it,
  the FP32 probabilities.
- v1, ``POST /v1/models/{name}:predict``: ``{"instances": [{"image": {"b64": "..."}}]}``.

This module runs only in the KServe virtual environment (:mod:`bench.peers.venvs`)::

    python -m bench.peers.kserve_model --model_path M.onnx --http_port 8080 --grpc_port 8081
"""

from __future__ import annotations

import argparse
import base64
import binascii

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.errors import InvalidInput
from kserve.utils.utils import generate_uuid

from bench.peers.common import MAX_PIXELS, load_model, softmax, top_k
from sepconv.preprocess import ImageError, preprocess_bytes

OUTPUT_NAME = "probabilities"


class OnnxImageClassifier(Model):
    def __init__(self, name: str, model_path: str) -> None:
        super().__init__(name)
        self.model_path = model_path
        self.load()

    def load(self) -> bool:
        self.session, self.spec = load_model(self.model_path)
        self.ready = True
        return self.ready

    def predict(self, payload, headers=None):
        if isinstance(payload, InferRequest):
            images = _v2_images(payload)
        elif isinstance(payload, dict) and isinstance(payload.get("instances"), list):
            images = _v1_images(payload["instances"])
        else:
            raise InvalidInput("expected an OIP v2 request or a v1 body with 'instances'")
        try:
            batch = np.stack(
                [preprocess_bytes(b, self.spec, max_pixels=MAX_PIXELS) for b in images]
            )
        except ImageError as exc:
            raise InvalidInput(str(exc)) from exc
        logits = self.session.run([self.spec.output_name], {self.spec.input_name: batch})[0]
        probs = softmax(logits)
        if isinstance(payload, InferRequest):
            return self._v2_response(payload, probs)
        labels = self.spec.labels
        return {
            "predictions": [
                [{"label": labels[i], "index": int(i), "probability": float(row[i])} for i in order]
                for row, order in zip(probs, top_k(probs, 5), strict=True)
            ]
        }

    def _v2_response(self, request: InferRequest, probs: np.ndarray) -> InferResponse:
        k = 0
        for requested in request.request_outputs or ():
            k = int((requested.parameters or {}).get("classification", 0) or 0)
        if k > 0:
            labels = self.spec.labels
            order = top_k(probs, k)
            strings = [
                f"{probs[r, i]:f}:{i}:{labels[i]}" for r in range(len(probs)) for i in order[r]
            ]
            output = InferOutput(OUTPUT_NAME, [len(probs), order.shape[1]], "BYTES", data=strings)
        else:
            output = InferOutput(OUTPUT_NAME, list(probs.shape), "FP32")
            output.set_data_from_numpy(probs.astype(np.float32), binary_data=False)
        return InferResponse(
            response_id=request.id or generate_uuid(), model_name=self.name, infer_outputs=[output]
        )


def _decode_element(item, where: str) -> bytes:
    if isinstance(item, bytes):  # gRPC: the raw file
        return item
    if isinstance(item, str):  # JSON cannot carry bytes: KServe's examples send base64
        try:
            return base64.b64decode(item, validate=True)
        except binascii.Error as exc:
            raise InvalidInput(f"{where} is not valid base64") from exc
    raise InvalidInput(f"{where} must be a base64 string")


def _v2_images(request: InferRequest) -> list[bytes]:
    if len(request.inputs) != 1:
        raise InvalidInput("expected one BYTES input holding the encoded images")
    infer_input = request.inputs[0]
    if infer_input.datatype != "BYTES":
        raise InvalidInput(f"input {infer_input.name!r} must be BYTES, not {infer_input.datatype}")
    data = infer_input.data
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).tolist()
    if not data:
        raise InvalidInput(f"input {infer_input.name!r} holds no image")
    return [
        _decode_element(item, f"input {infer_input.name!r} element {i}")
        for i, item in enumerate(data)
    ]


def _v1_images(instances: list) -> list[bytes]:
    if not instances:
        raise InvalidInput("'instances' is empty")
    out = []
    for i, instance in enumerate(instances):
        try:
            encoded = instance["image"]["b64"]
        except (KeyError, TypeError) as exc:
            raise InvalidInput(f"instances[{i}] must be {{'image': {{'b64': ...}}}}") from exc
        out.append(_decode_element(encoded, f"instances[{i}].image.b64"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="ONNX model to serve")
    args, _ = parser.parse_known_args()
    model = OnnxImageClassifier(args.model_name, args.model_path)
    # ModelServer reads its options (ports, workers, logging) from the same command line.
    ModelServer().start([model])


if __name__ == "__main__":
    main()
