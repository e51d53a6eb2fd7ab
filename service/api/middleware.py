"""Request body limit as pure ASGI middleware, so an oversized body is never buffered.

A declared ``Content-Length`` over the limit is refused before the app reads a byte; a chunked
body (no length) is counted while it streams and refused the moment it crosses the limit.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, error_body


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
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await self._reject(scope, send, body_too_large(limit))
                    return
                if declared >= 0:
                    # The server enforces Content-Length framing, so no counting is needed.
                    await self.app(scope, receive, send)
                    return
                break

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the app's body read: the app's error handler answers 413.
                    raise body_too_large(limit)
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _reject(scope: Scope, send: Send, exc: APIError) -> None:
        path = scope.get("path", "")
        body = orjson.dumps(
            {"error": exc.detail} if path.startswith("/v2") else error_body(exc.error, exc.detail)
        )
        await send(
            {
                "type": "http.response.start",
                "status": exc.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
