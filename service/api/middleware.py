"""Request body limit as pure ASGI middleware, so an oversized body is never buffered.

The check sits in ``receive``: a declared ``Content-Length`` over the limit fails the very first
read, before a byte of the body is pulled off the socket; a chunked body (no length) is counted
while it streams and fails the moment it crosses the limit. Failing inside the app's body read,
after routing, lets the usual error handler answer (JSON, and the metrics get the route
template). Starlette's ``RequestBodyLimitMiddleware`` works the same way but answers plain text.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError


def body_too_large(limit: int) -> APIError:
    return APIError(413, "body_too_large", f"the request body exceeds the limit of {limit} bytes")


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
