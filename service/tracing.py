"""OpenTelemetry traces of each inference request: request -> decode -> queue -> infer -> respond.

Off by default. ``SEPCONV_TRACING=true`` turns it on, and the standard OpenTelemetry variables
configure the rest (read by the SDK itself, nothing re-implemented here):

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (default), ``console`` or ``none``;
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``
  (default, as the specification says) or ``grpc``;
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``, ``..._HEADERS``, ``..._TIMEOUT``;
- ``OTEL_SERVICE_NAME`` (default ``sepconv-serve``), ``OTEL_RESOURCE_ATTRIBUTES``;
- ``OTEL_TRACES_SAMPLER`` / ``..._ARG`` (default ``parentbased_always_on``), ``OTEL_BSP_*``.

A W3C ``traceparent`` (HTTP header or gRPC metadata) makes the request span a child of the
caller's span. Requests that shared a batch are tied together by a ``batch`` span (its own
trace) that links to each of their request spans, and each request's ``infer`` span links back
to it and carries ``sepconv.batch.id``: from any request a trace backend leads to its batch and
from there to the others.

Stage spans are recorded from timestamps when the stage is over (``start_time``/``end_time``),
never made current, so no context is switched on the hot path. When tracing is off none of this
module's SDK code is imported and the request path tests one attribute for None.

Only the OpenTelemetry API is a core dependency; the SDK and the OTLP exporters come with the
``tracing`` extra, and are imported only when tracing is on (:class:`TracingUnavailable` names
the extra when they are missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import trace as trace_api
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.engine.context import RequestContext
from service.engine.observer import EngineObserver

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

SERVICE_NAME = "sepconv-serve"
INSTALL_HINT = "pip install 'sepconv-serve[tracing]'"
#: The span of the HTTP request being handled (set by the service middleware while tracing
#: is on), for the route to put in its RequestContext.
current_trace: ContextVar[RequestTrace | None] = ContextVar("sepconv_trace", default=None)
_PROPAGATOR = TraceContextTextMapPropagator()
#: The headers / metadata keys the W3C propagator reads, lower case as HTTP/2 and ASGI give them.
PROPAGATION_KEYS = frozenset(_PROPAGATOR.fields)


class TracingUnavailable(RuntimeError):
    """``SEPCONV_TRACING=true``, but the SDK or the exporter it needs is not installed."""


@contextlib.contextmanager
def _from_tracing_extra(what: str):
    try:
        yield
    except ImportError as exc:
        raise TracingUnavailable(
            f"SEPCONV_TRACING=true needs {what}, which is not installed "
            f"(no module {exc.name!r}): {INSTALL_HINT}"
        ) from exc


def monotonic_to_epoch_ns(t: float) -> int:
    """A ``time.monotonic()`` reading (the engine's clock) as the epoch nanoseconds spans use."""
    return time.time_ns() - int((time.monotonic() - t) * 1e9)


class RequestTrace:
    """The spans of one request; lives in ``RequestContext.trace`` while the request runs."""

    __slots__ = ("span", "_tracer", "_parent", "respond_from_ns")

    def __init__(self, tracer: trace_api.Tracer, span: trace_api.Span) -> None:
        self._tracer = tracer
        self.span = span
        self._parent = trace_api.set_span_in_context(span)
        #: When the model's answer came back: the ``respond`` span runs from here to the end.
        self.respond_from_ns: int | None = None

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def stage(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] = (),
    ) -> None:
        """A finished stage of this request, as a child span."""
        span = self._tracer.start_span(
            name, context=self._parent, start_time=start_ns, attributes=attributes, links=links
        )
        span.end(end_time=end_ns)

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def end(self, error: str | None = None, attributes: Mapping[str, Any] | None = None) -> None:
        """The response is out: the ``respond`` span (softmax, encoding, sending) and the
        request span end now."""
        now = time.time_ns()
        if self.respond_from_ns is not None:
            self.stage("respond", self.respond_from_ns, now)
        if attributes:
            self.span.set_attributes(attributes)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end(end_time=now)


class Tracing:
    """Creates the spans; one per process, on ``app.state.tracing`` (None when tracing is off)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("sepconv-serve")

    @classmethod
    def from_env(cls, exporter: SpanExporter | None = None) -> Tracing:
        """The SDK configured by the standard ``OTEL_*`` variables (module docstring)."""
        with _from_tracing_extra("the OpenTelemetry SDK"):
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
        # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over these.
        provider = TracerProvider(resource=Resource.create(attributes))
        exporter = exporter if exporter is not None else exporter_from_env()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def start_request(
        self,
        name: str,
        carrier: Mapping[str, str],
        *,
        kind: SpanKind = SpanKind.SERVER,
        attributes: Mapping[str, Any] | None = None,
    ) -> RequestTrace:
        """The request's span, a child of the caller's when ``carrier`` has a ``traceparent``."""
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        return RequestTrace(self.tracer, span)

    def batch(
        self,
        batch_id: int,
        started: float,
        ended: float,
        rows: Iterable[tuple[RequestTrace | None, float]],
        error: str | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """One model run: a ``batch`` span linked to every request in it, and for each request
        its ``queue`` (enqueued to batch start) and ``infer`` (the run) spans.

        ``started``/``ended`` and each row's enqueue time are ``time.monotonic()`` readings.
        A request with several rows in the batch gets one pair of spans, from its first row.
        """
        per_request: dict[int, tuple[RequestTrace, float, int]] = {}
        for trace, enqueued in rows:
            if trace is None:
                continue
            seen = per_request.get(id(trace))
            if seen is None:
                per_request[id(trace)] = (trace, enqueued, 1)
            else:
                per_request[id(trace)] = (trace, min(seen[1], enqueued), seen[2] + 1)
        start_ns, end_ns = monotonic_to_epoch_ns(started), monotonic_to_epoch_ns(ended)
        size = sum(n for _, _, n in per_request.values())
        links = [Link(t.span.get_span_context()) for t, _, _ in per_request.values()]
        batch_attributes = {
            **(attributes or {}),
            "sepconv.batch.id": batch_id,
            "sepconv.batch.size": size,
        }
        batch_span = self.tracer.start_span(
            "batch",
            context=trace_api.set_span_in_context(trace_api.INVALID_SPAN),  # a trace of its own
            start_time=start_ns,
            attributes=batch_attributes,
            links=links,
        )
        if error is not None:
            batch_span.set_status(Status(StatusCode.ERROR, error))
        batch_span.end(end_time=end_ns)
        back = [Link(batch_span.get_span_context())]
        for trace, enqueued, n in per_request.values():
            trace.stage("queue", monotonic_to_epoch_ns(enqueued), start_ns)
            trace.stage(
                "infer",
                start_ns,
                end_ns,
                {"sepconv.batch.id": batch_id, "sepconv.batch.size": size, "sepconv.rows": n},
                back,
            )

    def shutdown(self) -> None:
        """Export what is buffered and stop (the lifespan calls it on shutdown)."""
        self.provider.shutdown()


class TracingObserver(EngineObserver):
    """One model version's engine hooks as stage spans of the requests whose context carries a
    :class:`RequestTrace` (other requests cost a type check)."""

    def __init__(self, tracing: Tracing, model: str = "", version: str = "") -> None:
        self.tracing = tracing
        self.attributes = {"sepconv.model.name": model, "sepconv.model.version": version}

    def batch_finished(
        self,
        batch_id: int,
        started: float,
        ended: float,
        rows: Sequence[tuple[RequestContext | None, float]],
        error: str | None,
    ) -> None:
        traced = [
            (ctx.trace, enqueued)
            for ctx, enqueued in rows
            if ctx is not None and isinstance(ctx.trace, RequestTrace)
        ]
        if traced:
            self.tracing.batch(batch_id, started, ended, traced, error, self.attributes)

    def request_finished(
        self, ctx: RequestContext, started: float, seconds: float, error: BaseException | None
    ) -> None:
        trace = ctx.trace
        if not isinstance(trace, RequestTrace):
            return
        trace.span.set_attributes(self.attributes)
        if ctx.decode_s:
            start_ns = monotonic_to_epoch_ns(started)
            trace.stage("decode", start_ns, start_ns + int(ctx.decode_s * 1e9))
        if error is None:
            trace.respond_from_ns = monotonic_to_epoch_ns(started + seconds - ctx.postprocess_s)
        elif not isinstance(error, asyncio.CancelledError):
            trace.span.record_exception(error)


def exporter_class() -> type[SpanExporter] | None:
    """The exporter class ``OTEL_TRACES_EXPORTER`` (and the OTLP protocol variables) name."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if name == "none":
        return None
    if name == "console":
        with _from_tracing_extra("the OpenTelemetry SDK"):
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTLP protocol {protocol!r}: use http/protobuf or grpc")
    with _from_tracing_extra(f"the OTLP {protocol} exporter"):
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter


def exporter_from_env() -> SpanExporter | None:
    """The exporter ``OTEL_TRACES_EXPORTER`` names; its own settings come from ``OTEL_*`` too."""
    cls = exporter_class()
    return cls() if cls is not None else None


def check_available() -> None:
    """What ``SEPCONV_TRACING=true`` will import, imported now: the server refuses to start
    (one line) instead of every worker failing when it builds the app.

    Raises :class:`TracingUnavailable` or, for unsupported ``OTEL_*`` values, ValueError.
    """
    with _from_tracing_extra("the OpenTelemetry SDK"):
        import opentelemetry.sdk.trace  # noqa: F401
    exporter_class()
