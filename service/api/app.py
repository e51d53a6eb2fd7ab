"""Builds the FastAPI app: lifespan (the model repository: load, warm up, batchers), middleware,
error handlers, routers.

To add endpoints, write ``service/api/routes/<name>.py`` exposing ``router = APIRouter()`` and
add one import to ``ROUTERS`` below. Handlers reach models only through ``app.state.repository``
(:class:`~service.engine.repository.ModelRepository`, the seam every protocol calls).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

import sepconv
from service.api.errors import install_error_handlers
from service.api.fastpath import FastPath
from service.api.grpc_server import GrpcServer
from service.api.middleware import ServiceMiddleware
from service.api.routes import classify, cost, health, models, oip, triton_ext, ui
from service.drain import Drain
from service.engine.observer import EngineObserver, FanOut
from service.engine.repository import ModelRepository
from service.metrics import PrometheusObserver, RepositoryMetrics, mark_process_dead
from service.protocols import triton
from service.settings import Settings
from service.tracing import Tracing, TracingObserver

log = logging.getLogger("service")

#: Every router the app serves; one line per module. The hot routes come first because the
#: router tries routes in order.
ROUTERS = [
    classify.router,
    # Before the OIP router: /v2/models/stats must not be read as the metadata of a model
    # named "stats".
    triton_ext.router,
    oip.router,
    health.router,
    models.router,
    cost.router,
    # The web page last: nothing of it is tried before an API route.
    ui.router,
]

DESCRIPTION = """\
Image classification with a MobileNetV1 (depthwise-separable CNN) on ONNX Runtime.

Labels and preprocessing come from the model file's own metadata. Errors are JSON
`{"error": "<code>", "detail": "<sentence>"}`; Prometheus metrics are at `/metrics`.
"""


class ServiceApp(FastAPI):
    """FastAPI with the service's own layers outside its stack, outermost first:
    :class:`ServiceMiddleware` (request id and trace, drain, metrics, body limit: every request)
    and :class:`FastPath` (the inference routes, served without FastAPI's per-request
    machinery). Everything else goes through FastAPI's stack as usual."""

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        return ServiceMiddleware(
            FastPath(super().build_middleware_stack(), self),
            drain=self.state.drain,
            max_body_bytes=settings.max_body_bytes,
            tracing=self.state.tracing,
        )


def new_repository(settings: Settings, tracing: Tracing | None) -> ModelRepository:
    """A repository whose every model version reports to the metrics (and traces)."""

    def observer_for(name: str, version: str) -> EngineObserver:
        observer: EngineObserver = PrometheusObserver(name, version)
        if tracing is not None:
            observer = FanOut(observer, TracingObserver(tracing, name, version))
        return observer

    return ModelRepository(settings, observer_for=observer_for, events=RepositoryMetrics())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    start = time.perf_counter()
    repository = new_repository(settings, app.state.tracing)
    app.state.repository = repository
    app.state.drain.on_begin(repository.begin_drain)
    # Blocking on purpose: nothing is served before the models load. With one model file, a
    # failure here stops start-up (uvicorn exits non-zero) rather than leave a server that can
    # never be ready; a repository starts anyway, its index saying what failed.
    await repository.start()
    # Everything allocated so far (ONNX, FastAPI, the sessions) lives as long as the process.
    # Frozen, it is no longer rescanned by every full collection of the cyclic GC, whose pauses
    # showed in p99: 28 px model at concurrency 32, p99 37.5 ms before, 17.3 ms after.
    gc.collect()
    gc.freeze()
    grpc_server = None
    if settings.grpc_port:
        grpc_server = GrpcServer(repository, settings, app.state.tracing, app.state.reuse_port)
        try:
            app.state.grpc_port = await grpc_server.start(app.state.drain)
        except BaseException:
            await repository.stop()
            raise
    loaded = [e for e in repository.index() if e.state == "READY"]
    log.info(
        "%s in %.2f s: %s; batch<=%d, wait<=%g ms, gRPC %s",
        "ready" if repository.ready else "started, NOT ready (no model loaded)",
        time.perf_counter() - start,
        ", ".join(f"{e.name} v{e.version}" for e in loaded) or "no model",
        settings.max_batch_size,
        settings.max_wait_ms,
        f"on port {app.state.grpc_port}" if grpc_server else "off",
    )
    for entry in loaded:
        if not triton.is_numeric_version(entry.version):
            log.warning(
                "model %s version %r is not a number: Triton's perf_analyzer cannot read its "
                "statistics",
                entry.name,
                entry.version,
            )
    try:
        yield
    finally:
        # Not ready first, so a load balancer stops sending while queued requests drain.
        repository.begin_drain()
        if grpc_server is not None:
            # Health says NOT_SERVING, no new calls; the calls in flight finish on the batcher.
            await grpc_server.stop(settings.graceful_shutdown_s)
        await repository.stop()
        if app.state.tracing is not None:
            app.state.tracing.shutdown()  # export what is still buffered
        mark_process_dead()


def create_app(
    settings: Settings | None = None,
    drain: Drain | None = None,
    tracing: Tracing | None = None,
    *,
    reuse_port: bool = False,
) -> FastAPI:
    """The app; ``drain`` is shared with the server that starts it on SIGTERM (service.server);
    ``tracing`` replaces the one ``SEPCONV_TRACING`` configures from ``OTEL_*`` (tests pass one
    with an in-memory exporter); ``reuse_port``: one of several workers, whose gRPC socket joins
    the port's SO_REUSEPORT group."""
    settings = settings or Settings()
    drain = drain or Drain()
    if tracing is None and settings.tracing:
        tracing = Tracing.from_env()
    app = ServiceApp(
        title="sepconv-serve",
        version=sepconv.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The service has its own traces and metrics. FastAPI's would duplicate them once any
        # OpenTelemetry provider is configured, and checking whether one is costs every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.tracing = tracing
    app.state.drain = drain
    app.state.reuse_port = reuse_port
    # Not started: not ready, every model request answers 503 until the lifespan runs.
    app.state.repository = ModelRepository(settings)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
