"""The service's own ASGI layer, outermost: what every HTTP request gets, in one pass.

:class:`ServiceMiddleware` does, for every request:

- its id: ``X-Request-ID`` accepted (or made) and echoed, and set for the request's log lines;
  while tracing is on, the span of each inference request (a child of the caller's
  ``traceparent``), ended once the response is sent;
- ``Connection: close`` on the response while the server drains (:mod:`service.drain`);
- the HTTP metrics, by route template (``/v2/models/{name}/infer``), never the raw path, so a
  scanner hitting random URLs cannot blow up the series count;
- the request body limit, so an oversized body is never buffered.

One layer instead of four: each ASGI layer wraps ``send`` (and copies the response-start
message) once more per request, and these were four of the dozen or so a request went through.
It sits outside FastAPI's own stack (:class:`service.api.app.ServiceApp`), so the inference
routes that skip that stack (:mod:`service.api.fastpath`) get all of it too, and so do the 500s
FastAPI's error middleware answers.

The body limit sits in ``receive``: a declared ``Content-Length`` over the limit fails the very
first read, before a byte of the body is pulled off the socket; a chunked body (no length) is
counted while it streams and fails the moment it crosses the limit. Failing inside the app's
body read, after routing, lets the usual error handler answer (JSON in the route's protocol, and
the metrics get the route template). Starlette's ``RequestBodyLimitMiddleware`` works the same
way but answers plain text.

The context variables (request id, trace) are not reset afterwards: each request runs in a task
of its own.
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
REQUEST_ID = b"x-request-id"


def body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope``; a fixed label when none matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


def is_inference_path(path: str) -> bool:
    """The routes that classify (traced while tracing is on); checked before routing."""
    return path == "/v1/classify" or (path.startswith("/v2/models/") and path.endswith("/infer"))


class ServiceMiddleware:
    """Request id and trace, ``Connection: close`` while draining, HTTP metrics, body limit."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        drain: Drain,
        max_body_bytes: int,
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.drain = drain
        self.limit = max_body_bytes
        self.tracing = tracing
        #: (route, method, status) -> metric children; bounded like the label set itself, and it
        #: saves the label lookup (a lock and a dict) on every request.
        self._children: dict[tuple[str, str, int], tuple] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = declared = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                if given is None:
                    given = value
            elif name == b"content-length" and declared is None:
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1  # the HTTP server refuses malformed framing itself
        start_request(given)
        trace = None
        if self.tracing is not None and is_inference_path(scope["path"]):
            trace = self._start_trace(scope)
        # Decided when the request starts, so the hot path pays one attribute read; uvicorn
        # sees the header and closes the connection once the response is sent.
        closing = self.drain.draining
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if closing:
                    headers = [h for h in headers if h[0].lower() != CLOSE[0]]
                    headers.append(CLOSE)
                # The id as it is now: the route may have adopted the OIP request's ``id``.
                headers.append((REQUEST_ID, request_id_var.get().encode()))
                message = {**message, "headers": headers}
            await send(message)

        if declared is None or declared < 0 or declared > self.limit:
            receive = self._limited(receive, declared)
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
            if trace is not None:
                trace.span.update_name(f"{scope['method']} {route}")
                trace.end(
                    f"HTTP {status}" if status >= 500 else None,
                    {"http.route": route, "http.response.status_code": status},
                )

    def _limited(self, receive: Receive, declared: int | None) -> Receive:
        """``receive`` that fails once the body is over the limit (declared or counted)."""
        limit = self.limit
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise body_too_large(limit)  # refused before reading any of it
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        return limited_receive

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
