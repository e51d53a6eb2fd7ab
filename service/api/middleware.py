"""Pure ASGI middleware (no BaseHTTPMiddleware: no extra task or body copy per request).

:class:`RequestIdMiddleware`: request ids (and, while tracing is on, spans) for every request.
:class:`MetricsMiddleware`: HTTP traffic by route template.

:class:`ConnectionCloseMiddleware`: ``Connection: close`` on every response while draining.

:class:`BodySizeLimitMiddleware`: the request body limit, so an oversized body is never buffered.

The check sits in ``receive``: a declared ``Content-Length`` over the limit fails the very first
read, before a byte of the body is pulled off the socket; a chunked body (no length) is counted
while it streams and fails the moment it crosses the limit. Failing inside the app's body read,
after routing, lets the usual error handler answer (JSON, and the metrics get the route
template). Starlette's ``RequestBodyLimitMiddleware`` works the same way but answers plain text.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.drain import Drain
from service.errors import PayloadTooLarge
from service.logs import request_id_var, start_request, trace_id_var
from service.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS
from service.tracing import RequestTrace, Tracing, current_trace

UNMATCHED_ROUTE = "<unmatched>"
CLOSE = (b"connection", b"close")


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None  # the HTTP server refuses malformed framing itself
                break
        if declared is not None and declared <= limit:
            # The server enforces Content-Length framing, so there is nothing to count.
            await self.app(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None:
                raise body_too_large(limit)  # refused before reading any of it
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope``; a fixed label when none matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


class MetricsMiddleware:
    """HTTP traffic by route template (``/v2/models/{name}/infer``), never the raw path, so a
    scanner hitting random URLs cannot blow up the series count."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: (route, method, status) -> metric children; bounded like the label set itself, and it
        #: saves the label lookup (a lock and a dict) on every request.
        self._children: dict[tuple[str, str, int], tuple] = {}

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
            children = self._children.get(key)
            if children is None:
                labels = (route, scope["method"], str(status))
                children = self._children[key] = (
                    HTTP_REQUESTS.labels(*labels),
                    HTTP_DURATION.labels(*labels),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - start)


def is_inference_path(path: str) -> bool:
    """The routes that classify (traced while tracing is on); checked before routing."""
    return path == "/v1/classify" or (path.startswith("/v2/models/") and path.endswith("/infer"))


class RequestIdMiddleware:
    """``X-Request-ID`` accepted (or made) and echoed, the id in the log lines of the request,
    and, while tracing is on, the span of each inference request (a child of the caller's
    ``traceparent``), ended once the response is sent.

    The context variables are not reset afterwards: each request runs in a task of its own, and
    the app's handler for unexpected errors, which runs outside this middleware, logs with them.
    """

    def __init__(self, app: ASGIApp, tracing: Tracing | None = None) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
                break
        start_request(given)
        trace = None
        if self.tracing is not None and is_inference_path(scope["path"]):
            trace = self._start_trace(scope)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The id as it is now: the route may have adopted the OIP request's ``id``.
                header = (b"x-request-id", request_id_var.get().encode())
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if trace is not None:
                route = route_template(scope)
                trace.span.update_name(f"{scope['method']} {route}")
                trace.end(
                    f"HTTP {status}" if status >= 500 else None,
                    {"http.route": route, "http.response.status_code": status},
                )

    def _start_trace(self, scope: Scope) -> RequestTrace:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        trace = self.tracing.start_request(
            f"{scope['method']} {scope['path']}",
            carrier,
            attributes={
                "http.request.method": scope["method"],
                "url.path": scope["path"],
                "sepconv.request_id": request_id_var.get(),
            },
        )
        current_trace.set(trace)
        trace_id_var.set(trace.trace_id)
        return trace


class ConnectionCloseMiddleware:
    """While draining, every response asks the client to close its connection.

    Decided when a request starts, so the hot path pays one attribute read; uvicorn sees the
    header and closes the connection once the response is sent.
    """

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.drain.draining:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != CLOSE[0]]
                message = {**message, "headers": [*headers, CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing)
