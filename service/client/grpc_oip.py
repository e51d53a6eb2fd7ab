"""The gRPC transport: ``inference.GRPCInferenceService/ModelInfer`` (the Open Inference Protocol).

The image goes as the BYTES input ``image`` in ``raw_input_contents``; the ``probabilities``
output asks for Triton's classification extension, so the answer is the top-k strings. One
channel (thread-safe, multiplexed over one HTTP/2 connection) serves every worker thread.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from service.client.base import (
    Classification,
    Fatal,
    RequestFailed,
    Unreachable,
    only_ready_model,
    parse_classification,
)
from service.protocols import oip
from service.protocols.oip_grpc import inference_pb2 as pb
from service.protocols.oip_grpc import inference_pb2_grpc as pb_grpc

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
RETRY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
PUSHBACK = "grpc-retry-pushback-ms"
STATUS_DETAILS = "grpc-status-details-bin"


class GrpcTransport:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        top_k: int,
        model: str | None,
        version: str | None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.top_k = top_k
        self.model = model
        self.version = version
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> Exception:
        code: grpc.StatusCode = exc.code()
        trailers = dict(exc.trailing_metadata() or ())
        reason = _error_reason(trailers.get(STATUS_DETAILS))
        pushback = trailers.get(PUSHBACK)
        if code == grpc.StatusCode.UNAVAILABLE and pushback is None and reason is None:
            # Not an answer from the server's handlers: nothing listens there (or no gRPC).
            return Unreachable(f"cannot reach {self.target} over gRPC: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and reason is None:
            message = f"no answer within {self.timeout_s:g} s (--timeout)"
        else:
            message = exc.details() or code.name
        retry_after = None
        if code in RETRY_CODES and pushback is not None:
            try:
                retry_after = int(pushback) / 1000
            except ValueError:
                retry_after = 1.0
        kind = Fatal if code in FATAL_CODES else RequestFailed
        return kind(message, status=code.name, code=reason, retry_after_s=retry_after)

    def resolve_model(self) -> None:
        if self.model:
            return
        index = self._call(self.stub.RepositoryIndex, pb.RepositoryIndexRequest(ready=True))
        self.model = only_ready_model([(m.name, m.state) for m in index.models])

    def classify(self, name: str, data: bytes, content_type: str | None) -> Classification:
        request = pb.ModelInferRequest(model_name=self.model, model_version=self.version or "")
        request.inputs.add(name=oip.IMAGE_INPUT, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(oip.serialize_bytes([data]))
        output = request.outputs.add(name=oip.OUTPUT_NAME)
        output.parameters["classification"].int64_param = self.top_k
        response = self._call(self.stub.ModelInfer, request)
        try:
            (index,) = [i for i, o in enumerate(response.outputs) if o.name == oip.OUTPUT_NAME]
            if response.raw_output_contents:
                raw = response.raw_output_contents[index]
                elements = oip.deserialize_bytes(raw, oip.OUTPUT_NAME)
            else:
                elements = list(response.outputs[index].contents.bytes_contents)
            strings = [e.decode() for e in elements]
        except (ValueError, UnicodeDecodeError, oip.OIPError):
            raise RequestFailed("the server's answer is not an OIP classification") from None
        return Classification(
            response.model_name, response.model_version, parse_classification(strings)
        )


def _error_reason(details: bytes | None) -> str | None:
    """The stable error code in the richer error model's ``ErrorInfo``, when the server sent it."""
    if not details:
        return None
    status = status_pb2.Status()
    try:
        status.ParseFromString(details)
    except DecodeError:  # unreadable details just carry no reason
        return None
    for item in status.details:
        info = error_details_pb2.ErrorInfo()
        if item.Unpack(info):
            return info.reason
    return None
