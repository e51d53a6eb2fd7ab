"""Open Inference Protocol v2 over gRPC: protobuf messages to the engine's request and back.

Pure functions on the generated messages, no server and no I/O, so they are unit-tested alone;
the servicer does the I/O. The rules of the model's inputs and outputs are the REST codec's
(:mod:`service.protocols.oip`), called with what the protobuf carries, so both transports
accept and refuse exactly the same tensors with the same messages:

- the tensor input (named as in the ONNX graph): FP32 ``[N, C, H, W]``;
- ``image``: BYTES ``[N]`` or ``[N, 1]``, encoded image files;
- output ``probabilities``: FP32 ``[N, num_classes]``, or with the ``classification`` parameter
  (``InferRequestedOutput(class_count=k)``) BYTES ``[N, k]`` strings ``"score:index:label"``.

Tensor data comes either in ``raw_input_contents`` (one entry per input, what tritonclient sends)
or in each input's typed ``contents`` (``fp32_contents``, ``bytes_contents``). The response
carries its data in ``raw_output_contents``, as Triton's server does, which every client reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format

from sepconv.spec import ModelSpec
from service.protocols import oip
from service.protocols.oip_grpc import inference_pb2 as pb

_FP32 = np.dtype("<f4")
#: ``contents`` fields, by the datatype they belong to.
_CONTENTS_FIELD = {"FP32": "fp32_contents", "BYTES": "bytes_contents"}


def _param(value: pb.InferParameter) -> Any:
    """An ``InferParameter``'s value, whatever its type (None when unset)."""
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def request_timeout_s(msg: pb.ModelInferRequest) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds; tritonclient's ``timeout=``)."""
    if "timeout" not in msg.parameters:
        return None
    value = _param(msg.parameters["timeout"])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise oip.OIPError("parameter 'timeout' must be a non-negative integer of microseconds")
    return value / 1e6 if value else None


def parse_infer_request(msg: pb.ModelInferRequest, spec: ModelSpec) -> oip.InferRequest:
    """A ``ModelInferRequest`` as the engine's request; raises :class:`oip.OIPError` (400)."""
    if not msg.inputs:
        raise oip.OIPError("'inputs' must be a non-empty list")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise oip.OIPError(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
            "give one per input, or none and each input's 'contents'"
        )
    tensor: np.ndarray | None = None
    images: list[bytes] | None = None
    for i, item in enumerate(msg.inputs):
        name = item.name
        if name not in (spec.input_name, oip.IMAGE_INPUT):
            raise oip.OIPError(
                f"unknown input {name!r}; this model takes {spec.input_name!r} (FP32 "
                f"[N,{spec.channels},{spec.input_size},{spec.input_size}]) or "
                f"{oip.IMAGE_INPUT!r} (BYTES [N], encoded images)"
            )
        if tensor is not None or images is not None:
            raise oip.OIPError(
                f"give exactly one input, either {spec.input_name!r} or {oip.IMAGE_INPUT!r}, "
                "not both"
            )
        if "shared_memory_region" in item.parameters:
            raise oip.OIPError("the shared-memory extension is not supported")
        shape = tuple(item.shape)
        if any(d < 0 for d in shape):
            raise oip.OIPError(f"input {name!r}: 'shape' must be a list of non-negative integers")
        contents = _contents(item, bool(raw))
        if name == spec.input_name:
            if raw:
                tensor = oip.tensor_input({}, memoryview(raw[i]), shape, item.datatype, spec)
            else:
                tensor = oip.tensor_input(
                    {"data": np.asarray(contents, dtype=_FP32)}, None, shape, item.datatype, spec
                )
        elif raw:
            images = oip.image_input({}, memoryview(raw[i]), shape, item.datatype)
        else:
            images = _image_contents(contents, shape, item.datatype)
    return oip.InferRequest(
        id=msg.id or None,
        tensor=tensor,
        images=images,
        outputs=_requested_outputs(msg.outputs),
        binary_output=True,
    )


def _contents(item: pb.ModelInferRequest.InferInputTensor, has_raw: bool) -> Any:
    """The typed contents of ``item`` (None when the data is raw); refuses both or neither."""
    name = item.name
    filled = [field.name for field, _ in item.contents.ListFields()]
    if has_raw:
        if filled:
            raise oip.OIPError(
                f"input {name!r}: data in both 'contents' and raw_input_contents; use one"
            )
        return None
    expected = _CONTENTS_FIELD.get(item.datatype)
    if not filled:
        raise oip.OIPError(f"input {name!r} has neither 'contents' nor raw_input_contents")
    if expected is None or filled != [expected]:
        raise oip.OIPError(
            f"input {name!r}: datatype {item.datatype!r} with contents in {', '.join(filled)}; "
            f"FP32 data goes in fp32_contents, BYTES in bytes_contents"
        )
    return getattr(item.contents, expected)


def _image_contents(contents: Any, shape: tuple[int, ...], datatype: str) -> list[bytes]:
    # The REST codec's checks on shape and datatype, on an element list instead of JSON data.
    name = oip.IMAGE_INPUT
    if datatype != "BYTES":
        raise oip.OIPError(f"input {name!r}: datatype must be BYTES, got {datatype!r}")
    if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
        raise oip.OIPError(
            f"input {name!r}: shape must be [N] or [N,1] with N >= 1, got {list(shape)}"
        )
    images = list(contents)
    if len(images) != shape[0]:
        raise oip.OIPError(
            f"input {name!r}: shape {list(shape)} says {shape[0]} images, got {len(images)}"
        )
    return images


def _requested_outputs(outputs: Any) -> tuple[oip.RequestedOutput, ...]:
    parsed: list[oip.RequestedOutput] = []
    for item in outputs:
        name = item.name
        if name != oip.OUTPUT_NAME:
            raise oip.OIPError(f"unknown output {name!r}; this model produces {oip.OUTPUT_NAME!r}")
        if any(p.name == name for p in parsed):
            raise oip.OIPError(f"output {name!r} is requested twice")
        if "shared_memory_region" in item.parameters:
            raise oip.OIPError("the shared-memory extension is not supported")
        k = 0
        if "classification" in item.parameters:
            k = _param(item.parameters["classification"])
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise oip.OIPError(
                    f"output {name!r}: parameter classification must be an integer >= 0"
                )
        parsed.append(oip.RequestedOutput(name=name, binary=True, class_count=k))
    return tuple(parsed)


def infer_response(
    spec: ModelSpec, request: oip.InferRequest, probs: np.ndarray
) -> pb.ModelInferResponse:
    """The response to ``request``: each requested output, its data in ``raw_output_contents``."""
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=spec.version, id=request.id or ""
    )
    requested = request.outputs or (oip.RequestedOutput(oip.OUTPUT_NAME, True, 0),)
    rows = len(probs)
    for req in requested:
        if req.class_count:
            strings = oip.classification_strings(probs, req.class_count, spec.labels)
            shape = [rows, len(strings) // max(rows, 1)]
            response.outputs.add(name=req.name, datatype="BYTES", shape=shape)
            response.raw_output_contents.append(oip.serialize_bytes(strings))
        else:
            response.outputs.add(name=req.name, datatype="FP32", shape=list(probs.shape))
            response.raw_output_contents.append(np.ascontiguousarray(probs, _FP32).tobytes())
    return response


# --- documents shared with the REST routes ------------------------------------------------------


def from_document(document: dict[str, Any], message: Any) -> Any:
    """Fill ``message`` from the JSON document the REST route answers (proto field names).

    One builder per document serves both transports; an unknown field fails loudly here, so a
    REST document that grows a field the proto lacks is caught by the tests.
    """
    return json_format.ParseDict(document, message)


def server_metadata(document: dict[str, Any]) -> pb.ServerMetadataResponse:
    return from_document(document, pb.ServerMetadataResponse())


def model_metadata(spec: ModelSpec, versions: list[str] | None = None) -> pb.ModelMetadataResponse:
    return from_document(oip.model_metadata(spec, versions or ()), pb.ModelMetadataResponse())


def repository_parameters(
    msg: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
) -> dict[str, Any]:
    """A load or unload request's parameters as plain values (what HTTP's JSON gives)."""
    return {key: _param(value) for key, value in msg.parameters.items()}
