"""Pure ASGI middleware (no BaseHTTPMiddleware: no extra task or body copy per request).

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

from service.errors import PayloadTooLarge
from service.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS

UNMATCHED_ROUTE = "<unmatched>"


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
