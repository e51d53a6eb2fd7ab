"""Open Inference Protocol v2 (KServe / Triton) over HTTP: the wire codec, no web framework.

The router in ``service.api.routes.oip`` does the I/O and calls the Classifier seam; everything
here is a pure function from bytes to arrays and back, so it is unit-tested without a server.

What is understood:

- Inference request JSON (``id``, ``parameters``, ``inputs``, ``outputs``), tensor ``data`` flat or
  nested, row-major.
- Triton's binary tensor data extension: an ``Inference-Header-Content-Length`` header gives the
  JSON length, each binary input carries ``parameters.binary_data_size`` and its bytes follow the
  JSON in input order. Outputs are returned binary when ``parameters.binary_data`` (per output) or
  ``parameters.binary_data_output`` (per request) asks for it.
- Triton's classification extension: ``parameters.classification: k`` on a requested output
  returns BYTES ``"score:index:label"`` strings, the top k per row.

The served model has two alternative inputs, exactly one per request:

- the tensor input (named as in the ONNX graph): FP32 ``[N, C, H, W]``, already preprocessed;
- ``image``: BYTES ``[N]`` (or ``[N, 1]``), encoded images that the server decodes and
  preprocesses exactly as ``/v1/classify`` does. JSON cannot carry raw bytes, so in JSON ``data``
  each image is a base64 string; as binary tensor data it is the raw file.

and one output, ``probabilities``: FP32 ``[N, num_classes]``, the softmax of the logits.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from sepconv.spec import ModelSpec
from service.engine.postprocess import top_k_indices
from service.errors import InvalidRequest, ServiceError

SERVER_NAME = "sepconv-serve"
EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORM = "onnxruntime_onnx"
IMAGE_INPUT = "image"
OUTPUT_NAME = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

_FP32 = np.dtype("<f4")
_U32 = struct.Struct("<I")


class OIPError(InvalidRequest):
    """A request the protocol or the model cannot accept; the message is safe to show."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message, status_code=status_code)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: follow the request-level ``binary_data_output``
    class_count: int  # 0: the raw tensor, k > 0: top-k classification strings


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed request: exactly one of ``tensor`` and ``images`` is set."""

    id: str | None
    tensor: np.ndarray | None  # float32 (N, C, H, W)
    images: list[bytes] | None  # encoded image files
    outputs: tuple[RequestedOutput, ...]  # empty: every output with default settings
    binary_output: bool

    @property
    def batch_size(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)

    @property
    def names(self) -> tuple[str, ...]:
        """File names of the images: the protocol carries none."""
        return ()


# --- metadata ---------------------------------------------------------------------------------


def server_metadata(version: str, extensions: Sequence[str] = EXTENSIONS) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(extensions)}


def model_metadata(spec: ModelSpec, versions: Sequence[str] = ()) -> dict[str, Any]:
    """The model's metadata; ``versions``: those loaded (default: the spec's own)."""
    side = spec.input_size
    return {
        "name": spec.name,
        "versions": list(versions) or [spec.version],
        "platform": PLATFORM,
        "inputs": [
            {"name": spec.input_name, "datatype": "FP32", "shape": [-1, spec.channels, side, side]},
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
    }


# --- request ----------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str | None, *, max_bytes: int) -> bytes:
    """Undo a request ``Content-Encoding`` (tritonclient can send gzip or deflate bodies).

    The output is capped at ``max_bytes`` while inflating, so a small compressed body cannot
    expand into gigabytes (413).
    """
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif coding == "deflate":  # HTTP "deflate" is the zlib format (RFC 9110 8.4.1.2)
        inflater = zlib.decompressobj(zlib.MAX_WBITS)
    else:
        raise OIPError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none", 415)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise OIPError(f"request body is not valid {coding} data: {exc}") from None
    if len(out) > max_bytes:
        raise OIPError(f"decompressed request body exceeds the limit of {max_bytes} bytes", 413)
    if not inflater.eof:
        raise OIPError(f"request body is truncated {coding} data")
    return out


def parse_request(body: bytes, header_length: str | None, spec: ModelSpec) -> InferRequest:
    """Parse an infer request body (JSON, optionally followed by binary tensor data).

    ``header_length`` is the raw ``Inference-Header-Content-Length`` header value, or None.
    Raises :class:`OIPError` naming the first problem found.
    """
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[:0]
    else:
        try:
            json_len = int(header_length)
        except ValueError:
            raise OIPError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < json_len <= len(body):
            raise OIPError(
                f"{HEADER_LENGTH} is {json_len} but the body has {len(body)} bytes; it must give "
                "the length of the JSON part"
            )
        json_part, binary = view[:json_len], view[json_len:]
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        hint = "" if header_length is not None else f" (binary data needs a {HEADER_LENGTH} header)"
        raise OIPError(f"request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise OIPError("inference request must be a JSON object")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OIPError("'id' must be a string")
    params = _params(doc, "request")
    binary_output = _bool_param(params, "binary_data_output", "request")

    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise OIPError("'inputs' must be a non-empty list")
    tensor: np.ndarray | None = None
    images: list[bytes] | None = None
    offset = 0
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise OIPError(f"inputs[{i}] must be a JSON object")
        name = item.get("name")
        if name == spec.input_name:
            target = "tensor"
        elif name == IMAGE_INPUT:
            target = "image"
        else:
            raise OIPError(
                f"unknown input {name!r}; this model takes {spec.input_name!r} (FP32 "
                f"[N,{spec.channels},{spec.input_size},{spec.input_size}]) or "
                f"{IMAGE_INPUT!r} (BYTES [N], encoded images)"
            )
        if tensor is not None or images is not None:
            raise OIPError(
                f"give exactly one input, either {spec.input_name!r} or {IMAGE_INPUT!r}, not both"
            )
        shape = _shape(item.get("shape"), name)
        datatype = item.get("datatype")
        in_params = _params(item, f"input {name!r}")
        if "shared_memory_region" in in_params:
            raise OIPError("the shared-memory extension is not supported")
        raw: memoryview | None = None
        if "binary_data_size" in in_params:
            size = in_params["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise OIPError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise OIPError(
                    f"input {name!r}: binary_data_size is {size} but only "
                    f"{len(binary) - offset} bytes of binary data follow the JSON"
                )
            raw = binary[offset : offset + size]
            offset += size
        elif "data" not in item:
            raise OIPError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        if target == "tensor":
            tensor = tensor_input(item, raw, shape, datatype, spec)
        else:
            images = image_input(item, raw, shape, datatype)
    if offset != len(binary):
        raise OIPError(
            f"{len(binary) - offset} bytes of binary data follow the JSON that no input's "
            "binary_data_size accounts for"
        )
    return InferRequest(
        id=request_id,
        tensor=tensor,
        images=images,
        outputs=_requested_outputs(doc.get("outputs")),
        binary_output=binary_output,
    )


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise OIPError(f"{where}: 'parameters' must be a JSON object")
    return params


def _bool_param(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise OIPError(f"{where}: parameters.{key} must be true or false")
    return value


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise OIPError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return tuple(shape)


def tensor_input(
    item: dict[str, Any],
    raw: memoryview | None,
    shape: tuple[int, ...],
    datatype: Any,
    spec: ModelSpec,
) -> np.ndarray:
    """The tensor input from JSON ``item["data"]`` or ``raw`` little-endian bytes, checked
    against the model (the gRPC codec calls it too, so both transports apply the same rules)."""
    name = spec.input_name
    if datatype != "FP32":
        raise OIPError(f"input {name!r}: datatype must be FP32, got {datatype!r}")
    expected = (spec.channels, spec.input_size, spec.input_size)
    if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
        raise OIPError(
            f"input {name!r}: shape must be [N,{','.join(map(str, expected))}] with N >= 1, "
            f"got {list(shape)}"
        )
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * _FP32.itemsize:
            raise OIPError(
                f"input {name!r}: shape {list(shape)} needs {count * _FP32.itemsize} bytes of "
                f"FP32 data, binary_data_size gives {len(raw)}"
            )
        # Zero-copy view of the request body; the batcher copies rows when it stacks a batch.
        array = np.frombuffer(raw, dtype=_FP32).reshape(shape)
    else:
        try:
            array = np.asarray(item["data"])
        except (ValueError, TypeError):
            raise OIPError(f"input {name!r}: 'data' is not a regular array of numbers") from None
        if array.dtype.kind not in "iuf":
            raise OIPError(f"input {name!r}: 'data' must hold only numbers")
        if array.size != count:
            raise OIPError(
                f"input {name!r}: shape {list(shape)} has {count} elements, 'data' has {array.size}"
            )
        array = array.astype(np.float32, copy=False).reshape(shape)
    if not np.isfinite(array).all():
        raise OIPError(f"input {name!r}: data contains NaN or infinity")
    return array


def image_input(
    item: dict[str, Any], raw: memoryview | None, shape: tuple[int, ...], datatype: Any
) -> list[bytes]:
    """The encoded images from JSON base64 ``item["data"]`` or ``raw`` BYTES tensor data."""
    name = IMAGE_INPUT
    if datatype != "BYTES":
        raise OIPError(f"input {name!r}: datatype must be BYTES, got {datatype!r}")
    if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
        raise OIPError(f"input {name!r}: shape must be [N] or [N,1] with N >= 1, got {list(shape)}")
    count = shape[0]
    if raw is not None:
        images = deserialize_bytes(raw, name)
    else:
        images = _base64_elements(item["data"], name)
    if len(images) != count:
        raise OIPError(
            f"input {name!r}: shape {list(shape)} says {count} images, got {len(images)}"
        )
    return images


def deserialize_bytes(raw: memoryview | bytes, name: str = "") -> list[bytes]:
    """BYTES tensor binary form: each element is a 4-byte little-endian length, then the bytes."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 4:
            raise OIPError(f"input {name!r}: BYTES data ends inside an element's length prefix")
        (length,) = _U32.unpack_from(raw, pos)
        pos += 4
        if length > end - pos:
            raise OIPError(
                f"input {name!r}: BYTES element {len(out)} declares {length} bytes, "
                f"only {end - pos} remain"
            )
        out.append(bytes(raw[pos : pos + length]))
        pos += length
    return out


def serialize_bytes(elements: list[bytes]) -> bytes:
    """Inverse of :func:`deserialize_bytes`."""
    return b"".join(_U32.pack(len(e)) + e for e in elements)


def _base64_elements(data: Any, name: str) -> list[bytes]:
    # Accept [N] or [N,1] nesting, as a client flattening row-major or not may send either.
    flat = (
        [e[0] if isinstance(e, list) and len(e) == 1 else e for e in data]
        if isinstance(data, list)
        else None
    )
    if flat is None or not all(isinstance(e, str) for e in flat):
        raise OIPError(f"input {name!r}: JSON 'data' must be a list of base64 strings")
    out = []
    for i, text in enumerate(flat):
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise OIPError(
                f"input {name!r}: element {i} is not valid base64 (in JSON, images are base64; "
                "send raw files with the binary tensor extension)"
            ) from None
    return out


def _requested_outputs(outputs: Any) -> tuple[RequestedOutput, ...]:
    if outputs is None:
        return ()
    if not isinstance(outputs, list):
        raise OIPError("'outputs' must be a list")
    parsed: list[RequestedOutput] = []
    for i, item in enumerate(outputs):
        if not isinstance(item, dict):
            raise OIPError(f"outputs[{i}] must be a JSON object")
        name = item.get("name")
        if name != OUTPUT_NAME:
            raise OIPError(f"unknown output {name!r}; this model produces {OUTPUT_NAME!r}")
        if any(p.name == name for p in parsed):
            raise OIPError(f"output {name!r} is requested twice")
        params = _params(item, f"output {name!r}")
        if "shared_memory_region" in params:
            raise OIPError("the shared-memory extension is not supported")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise OIPError(f"output {name!r}: parameters.binary_data must be true or false")
        k = params.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise OIPError(f"output {name!r}: parameters.classification must be an integer >= 0")
        parsed.append(RequestedOutput(name=name, binary=binary, class_count=k))
    return tuple(parsed)


# --- response ---------------------------------------------------------------------------------


def classification_strings(probs: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Top-k ``"score:index:label"`` per row, row-major, highest score first (Triton's format).

    ``k`` larger than the number of classes returns every class.
    """
    top = top_k_indices(probs, k)
    return [f"{probs[r, i]:f}:{i}:{labels[i]}".encode() for r in range(len(probs)) for i in top[r]]


def build_response(
    *,
    model_name: str,
    model_version: str,
    request: InferRequest,
    probs: np.ndarray,
    labels: list[str],
) -> tuple[bytes, int | None]:
    """Serialise the response; returns ``(body, json_length)``, json_length None if all JSON.

    When any output is binary, the body is the JSON header followed by the binary outputs in
    order, and ``json_length`` goes in the ``Inference-Header-Content-Length`` header.
    """
    requested = request.outputs or (RequestedOutput(OUTPUT_NAME, None, 0),)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for req in requested:
        binary = request.binary_output if req.binary is None else req.binary
        if req.class_count:
            strings = classification_strings(probs, req.class_count, labels)
            out: dict[str, Any] = {
                "name": req.name,
                "datatype": "BYTES",
                "shape": [len(probs), len(strings) // max(len(probs), 1)],
            }
            if binary:
                blob = serialize_bytes(strings)
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = [s.decode() for s in strings]
        else:
            out = {"name": req.name, "datatype": "FP32", "shape": list(probs.shape)}
            flat = np.ascontiguousarray(probs, dtype=_FP32).reshape(-1)
            if binary:
                blob = flat.tobytes()
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = flat
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(exc: ServiceError) -> bytes:
    """The protocol's error shape: ``{"error": "<sentence>"}``."""
    return orjson.dumps({"error": exc.detail})
