"""Prometheus metrics (default registry), plus the ASGI middleware that records HTTP traffic.

Names follow Prometheus conventions: base units (seconds), ``_total`` on counters, and the
``route`` label is the route template (``/v2/models/{name}/infer``), never the raw path, so a
scanner hitting random URLs cannot blow up the series count.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Sub-millisecond to seconds: a 28px image takes ~0.1 ms to preprocess, a 224px batch ~100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

HTTP_REQUESTS = Counter(
    "sepconv_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "sepconv_http_request_duration_seconds",
    "End-to-end HTTP request latency, by route template, method and status code.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("sepconv_http_requests_in_flight", "HTTP requests being handled right now.")
PREPROCESS_DURATION = Histogram(
    "sepconv_preprocess_duration_seconds",
    "Decode and preprocess time per image.",
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "sepconv_inference_duration_seconds",
    "ONNX Runtime session.run time per batch.",
    buckets=LATENCY_BUCKETS,
)
IMAGES_CLASSIFIED = Counter(
    "sepconv_images_classified_total", "Images that went through the model."
)
MODEL_INFO = Info("sepconv_model", "The served model and the execution provider that runs it.")

BATCH_QUEUE_WAIT = Histogram(
    "sepconv_batch_queue_wait_seconds",
    "Time an image waited in the batch queue before its batch started.",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "sepconv_batch_size", "Images per batch sent to the model.", buckets=BATCH_SIZE_BUCKETS
)
BATCH_QUEUE_DEPTH = Gauge("sepconv_batch_queue_depth", "Images waiting in the batch queue.")
BATCH_REJECTED = Counter(
    "sepconv_batch_rejected_total",
    "Images the batcher refused or gave up on, by reason (queue_full, timeout).",
    ["reason"],
)

UNMATCHED_ROUTE = "<unmatched>"

#: (route, method, status) -> metric children; bounded like the label set itself, and it saves
#: the label lookup (a lock and a dict) on every request.
_children: dict[tuple[str, str, int], tuple] = {}


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope``; a fixed label when none matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): no extra task or body copy per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            HTTP_IN_FLIGHT.dec()
            route = route_template(scope)
            key = (route, scope["method"], status)
            children = _children.get(key)
            if children is None:
                labels = (route, scope["method"], str(status))
                children = _children[key] = (
                    HTTP_REQUESTS.labels(*labels),
                    HTTP_DURATION.labels(*labels),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
