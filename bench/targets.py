"""What a workload sends: the model's sample images to ``POST /v1/classify``, or the same images
(or their preprocessed tensors) as Open Inference Protocol binary requests.

OIP bodies are encoded with the server's own codec (:mod:`service.protocols.oip`: BYTES
serialisation, input and output names, the header-length header), so the benchmark cannot
drift from what the server parses.
"""

from __future__ import annotations

import argparse

import orjson

from bench import loadgen
from bench.models import BenchModel, image_format, sample_images
from service.engine.decode import preprocess_images
from service.protocols import oip
from service.settings import Settings

ENDPOINTS = ("classify", "oip", "oip-tensor")


def add_endpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="classify",
        help="classify: POST /v1/classify, encoded image body; oip: the same image as an OIP "
        "BYTES input; oip-tensor: the preprocessed FP32 tensor, binary (what raw ORT is fed: "
        "the server's own overhead, without decoding)",
    )


def oip_binary_request(
    name: str, datatype: str, shape: list[int], data: bytes
) -> tuple[bytes, bytes]:
    """(JSON header, whole body) of a one-input OIP request whose tensor data travels as binary
    after the JSON (Triton's binary tensor extension); the output is asked for binary too."""
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": shape,
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": oip.OUTPUT_NAME, "parameters": {"binary_data": True}}],
        }
    )
    return header, header + data


def target_for(model: BenchModel, host: str, port: int, endpoint: str) -> loadgen.Target:
    """64 distinct requests for ``endpoint`` (one of :data:`ENDPOINTS`), used round-robin."""
    images = sample_images(model.spec, count=64)
    if endpoint == "classify":
        _, media_type = image_format(model.spec)
        return loadgen.Target(host, port, "/v1/classify", tuple(images), content_type=media_type)
    if endpoint == "oip-tensor":
        tensors = preprocess_images(images, model.spec, max_pixels=Settings().max_pixels)
        requests = [
            oip_binary_request(model.spec.input_name, "FP32", list(t[None].shape), t.tobytes())
            for t in tensors
        ]
    elif endpoint == "oip":
        requests = [
            oip_binary_request(oip.IMAGE_INPUT, "BYTES", [1], oip.serialize_bytes([image]))
            for image in images
        ]
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {', '.join(ENDPOINTS)}")
    header_lengths = {len(header) for header, _ in requests}
    if len(header_lengths) != 1:  # one pre-built header value per request is all Target supports
        raise RuntimeError("OIP headers differ in length across images")
    return loadgen.Target(
        host,
        port,
        f"/v2/models/{model.spec.name}/infer",
        tuple(body for _, body in requests),
        content_type=oip.BINARY_CONTENT_TYPE,
        extra_headers=((oip.HEADER_LENGTH, str(header_lengths.pop())),),
    )
