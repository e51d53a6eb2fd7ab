"""The Open Inference Protocol v2 over gRPC, on grpc.aio, in the HTTP app's process and event loop.

The HTTP app's lifespan starts it once the models are warm and stops it on shutdown, so both
transports share the one seam (the model repository) and its batchers: gRPC and HTTP requests
batch together.
Handlers translate with :mod:`service.protocols.oip_grpc.codec` and raise service errors;
:func:`abort_with` is the one place those become gRPC status codes. ``grpc.health.v1`` answers
SERVING for the server (``""``) and for ``inference.GRPCInferenceService`` from start-up,
NOT_SERVING from the start of draining.

Limits are HTTP's: a message over ``SEPCONV_MAX_BODY_BYTES`` (after decompression) is refused by
gRPC itself with RESOURCE_EXHAUSTED, images over ``SEPCONV_MAX_PIXELS`` and requests with more
rows than the queue holds with INVALID_ARGUMENT. The client's deadline (and Triton's ``timeout``
parameter) becomes the request's deadline in the engine, which drops work nobody waits for.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import sepconv
from sepconv.spec import ModelSpec
from service.drain import Drain
from service.engine.context import RequestContext
from service.engine.repository import ModelRepository
from service.errors import InferenceFailed, ServiceError
from service.logs import REQUEST_ID_HEADER, request_id_from, request_id_var, trace_id_var
from service.metrics import GRPC_DURATION, GRPC_REQUESTS, inference_counters
from service.protocols import oip, triton
from service.protocols.oip_grpc import codec
from service.protocols.oip_grpc import inference_pb2 as pb
from service.protocols.oip_grpc import inference_pb2_grpc as pb_grpc
from service.settings import Settings
from service.tracing import Tracing

log = logging.getLogger("service.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"

#: HTTP status of a service error -> gRPC status code; other 4xx are INVALID_ARGUMENT, other
#: 5xx INTERNAL.
GRPC_CODES = {
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(exc: ServiceError) -> grpc.StatusCode:
    code = GRPC_CODES.get(exc.status_code)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if exc.status_code < 500 else grpc.StatusCode.INTERNAL


def error_trailers(exc: ServiceError, code: grpc.StatusCode) -> tuple[tuple[str, Any], ...]:
    """The richer error model's ``grpc-status-details-bin``: a ``google.rpc.Status`` with an
    ``ErrorInfo`` (the stable error code /v1 answers too) and, for retryable errors, a
    ``RetryInfo``; plus gRPC's own ``grpc-retry-pushback-ms``, which a client with a retry
    policy obeys (gRFC A6)."""
    details = [error_details_pb2.ErrorInfo(reason=exc.code, domain=oip.SERVER_NAME)]
    trailers: list[tuple[str, Any]] = []
    if exc.retry_after_s is not None:
        delay = duration_pb2.Duration(seconds=int(exc.retry_after_s))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        trailers.append(("grpc-retry-pushback-ms", str(int(exc.retry_after_s * 1000))))
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = status_pb2.Status(code=code.value[0], message=exc.detail, details=packed)
    trailers.append(("grpc-status-details-bin", status.SerializeToString()))
    return tuple(trailers)


async def abort_with(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    code = grpc_code(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("gRPC call failed: %s: %s", exc.code, exc.detail)
    await context.abort(code, exc.detail, error_trailers(exc, code))


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` entries left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def rpc(method):
    """Request id, metrics, tracing and the error mapping around one servicer method."""
    name = method.__name__
    children: dict[grpc.StatusCode, tuple] = {}  # the metrics' label children, by status

    @functools.wraps(method)
    async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        metadata = _metadata(context)
        request_id = request_id_from(metadata.get(REQUEST_ID_HEADER) or getattr(request, "id", ""))
        token = request_id_var.set(request_id)
        trace = None
        if self.tracing is not None and name == "ModelInfer":
            trace = self.tracing.start_request(
                f"{SERVICE_NAME}/{name}",
                metadata,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": SERVICE_NAME,
                    "rpc.method": name,
                    "sepconv.request_id": request_id,
                },
            )
            trace_token = trace_id_var.set(trace.trace_id)
        code = grpc.StatusCode.OK
        error: ServiceError | None = None
        try:
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            try:
                return await method(self, request, context, trace)
            except ServiceError as exc:
                error = exc
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("gRPC %s failed", name)
                error = InferenceFailed("the server failed to handle this request")
                error.code = "internal_error"
            code = grpc_code(error)
            await abort_with(context, error)
        finally:
            metrics = children.get(code)
            if metrics is None:
                metrics = children[code] = (
                    GRPC_REQUESTS.labels(name, code.name),
                    GRPC_DURATION.labels(name, code.name),
                )
            metrics[0].inc()
            metrics[1].observe(time.perf_counter() - start)
            if trace is not None:
                failure = error.detail if error is not None else None
                if code == grpc.StatusCode.CANCELLED:
                    failure = "cancelled: the client went away or its deadline passed"
                trace.end(failure, {"rpc.grpc.status_code": code.value[0]})
                trace_id_var.reset(trace_token)
            request_id_var.reset(token)

    return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on the model repository (the seam)."""

    def __init__(
        self, repository: ModelRepository, settings: Settings, tracing: Tracing | None = None
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.tracing = tracing

    # --- health and metadata
    @rpc
    async def ServerLive(self, request, context, trace) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.repository.live)

    @rpc
    async def ServerReady(self, request, context, trace) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.ready)

    @rpc
    async def ModelReady(self, request, context, trace) -> pb.ModelReadyResponse:
        # As Triton answers: not ready, rather than an error, for a model it does not serve.
        ready = self.repository.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @rpc
    async def ServerMetadata(self, request, context, trace) -> pb.ServerMetadataResponse:
        document = oip.server_metadata(sepconv.__version__, triton.server_extensions())
        return codec.server_metadata(document)

    @rpc
    async def ModelMetadata(self, request, context, trace) -> pb.ModelMetadataResponse:
        version = request.version or None
        with self.repository.lease(request.name, version) as classifier:
            versions = [version] if version else self.repository.versions(request.name)
            return codec.model_metadata(classifier.spec, versions)

    @rpc
    async def ModelConfig(self, request, context, trace) -> pb.ModelConfigResponse:
        with self.repository.lease(request.name, request.version or None) as classifier:
            provider = classifier.runtime.providers[0]
            config = triton.served_model_config(classifier.spec, self.settings, provider)
        return pb.ModelConfigResponse(config=codec.from_document(config, pb.ModelConfig()))

    @rpc
    async def ModelStatistics(self, request, context, trace) -> pb.ModelStatisticsResponse:
        specs: list[ModelSpec]
        if request.name:
            with self.repository.lease(request.name, request.version or None) as classifier:
                specs = [classifier.spec]
        else:
            specs = [classifier.spec for classifier in self.repository.loaded()]
        stats = triton.statistics_of(specs, inference_counters())
        return codec.from_document(triton.model_statistics(stats), pb.ModelStatisticsResponse())

    # --- model repository
    @rpc
    async def RepositoryIndex(self, request, context, trace) -> pb.RepositoryIndexResponse:
        entries = self.repository.index(ready_only=request.ready)
        document = {"models": [entry.document() for entry in entries]}
        return codec.from_document(document, pb.RepositoryIndexResponse())

    @rpc
    async def RepositoryModelLoad(self, request, context, trace) -> pb.RepositoryModelLoadResponse:
        triton.check_repository_parameters("load", codec.repository_parameters(request))
        await self.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request, context, trace
    ) -> pb.RepositoryModelUnloadResponse:
        triton.check_repository_parameters("unload", codec.repository_parameters(request))
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference
    @rpc
    async def ModelInfer(self, request, context, trace) -> pb.ModelInferResponse:
        ctx = RequestContext(
            request_id=request_id_var.get(),
            protocol="oip-grpc",
            deadline=_deadline(context, codec.request_timeout_s(request)),
            trace=trace,
        )

        async def parse(spec: ModelSpec):
            # After admission: a refused call is never parsed.
            return codec.parse_infer_request(request, spec)

        answer = await self.repository.infer(
            parse, ctx, request.model_name, request.model_version or None
        )
        return codec.infer_response(answer.spec, answer.inputs, answer.probs)


def _deadline(context: grpc.aio.ServicerContext, timeout_s: float | None) -> float | None:
    """The earlier of the client's gRPC deadline and Triton's ``timeout`` parameter, on the
    engine's clock (``time.monotonic()``)."""
    remaining = context.time_remaining()
    candidates = [s for s in (remaining, timeout_s) if s is not None]
    return time.monotonic() + min(candidates) if candidates else None


class GrpcServer:
    """The gRPC server of one process: ``await start()`` after warm-up, ``await stop()`` first
    thing on shutdown. ``reuse_port``: one of several workers, each with its own socket in the
    port's SO_REUSEPORT group (as service.supervisor does for HTTP); a single process must not
    silently join another server's group."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        tracing: Tracing | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ]
        )
        servicer = InferenceServicer(repository, settings, tracing)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    async def start(self, drain: Drain | None = None) -> int:
        """Listen and serve; returns the port (the one bound when the setting is a free port)."""
        host = self.settings.host
        port = self.settings.grpc_port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if drain is not None:
            # SIGTERM's drain delay: health checkers see NOT_SERVING while calls still run.
            loop = asyncio.get_running_loop()
            drain.on_begin(
                lambda: loop.call_soon_threadsafe(
                    lambda: loop.create_task(self.health.enter_graceful_shutdown())
                )
            )
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING for health checkers, no new calls, and up to ``grace_s`` for the calls
        in flight to finish before they are cancelled."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
