"""The inference routes, served without the framework's per-request machinery.

``POST /v1/classify`` and ``POST /v2/models/{name}[/versions/{version}]/infer`` carry nearly all
the traffic, and FastAPI's machinery around them cost more than the model: its middleware stack
(error, telemetry and body-limit layers, the exception middleware, an exit stack), the router
trying each route in turn, two request wrappers and dependency solving took about a sixth of a
worker's CPU per request on the 28 px model (py-spy, in-process, c=32; docs/hotpath.md).

:class:`FastPath` sits between :class:`~service.api.middleware.ServiceMiddleware` (request id,
trace, metrics, body limit, drain: every request gets them, this path too) and FastAPI's stack.
For those routes it matches the path itself and calls the very endpoint function FastAPI would
call, with a Starlette ``Request``; the endpoint's errors go through the app's own exception
handlers (:mod:`service.api.errors`), so both paths answer the same bytes. Everything else, and
any other method on these paths, goes on to FastAPI, which still declares the routes (OpenAPI).

A request the model would refuse (admission control) is answered here before anything else: no
``Request``, no query parsing beyond the model's name, no body read. Whether to refuse, and the
refusal's pacing, are the repository's to decide (:meth:`~service.engine.repository.
ModelRepository.admission_refusal`); this layer only encodes the 429 in the route's protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import model_query, repository_of
from service.api.errors import ProtocolRoute, error_response
from service.api.middleware import is_inference_path
from service.api.routes import classify, oip

#: The model a request names: (name or None for the default, version or None for the latest).
Target = Callable[[Request], tuple[str | None, str | None]]


def _oip_target(request: Request) -> tuple[str | None, str | None]:
    params = request.path_params
    return params["model_name"], params.get("model_version")


#: Endpoint -> how a request to it names its model. Only POST routes with these endpoints take
#: the fast path.
HOT_ENDPOINTS: dict[Callable[..., Awaitable[Response]], Target] = {
    classify.classify: model_query,
    oip.infer: _oip_target,
}


class FastPath:
    """Serves the hot routes of ``app`` straight from the ASGI call; ``inner`` (FastAPI's own
    stack) serves the rest."""

    def __init__(self, inner: ASGIApp, app: FastAPI) -> None:
        self.inner = inner
        self.app = app
        self.routes: list[tuple[ProtocolRoute, Target]] = [
            (route, HOT_ENDPOINTS[route.endpoint])
            for route in (*classify.router.routes, *oip.router.routes)
            if isinstance(route, ProtocolRoute)
            and route.endpoint in HOT_ENDPOINTS
            and "POST" in route.methods
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and is_inference_path(scope["path"])
        ):
            for route, target in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    await self._serve(route, target, child, scope, receive, send)
                    return
        await self.inner(scope, receive, send)

    async def _serve(
        self,
        route: ProtocolRoute,
        target: Target,
        child: dict[str, Any],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        # What FastAPI's router would have put in the scope: the route (metrics and errors read
        # its template and protocol), the endpoint and the path parameters.
        scope.update(child)
        scope["app"] = self.app
        scope.setdefault("router", self.app.router)
        request = Request(scope, receive, send)
        repository = repository_of(request)
        refusal = await repository.admission_refusal(*target(request))
        if refusal is not None:
            await error_response(request, refusal)(scope, receive, send)
            return
        try:
            response = await route.endpoint(request, **scope["path_params"])
        except Exception as exc:
            response = await self._handle(request, exc, scope, receive, send)
        await response(scope, receive, send)

    async def _handle(
        self, request: Request, exc: Exception, scope: Scope, receive: Receive, send: Send
    ) -> Response:
        """The app's handler for ``exc``, as FastAPI's exception middleware would pick it; an
        error no handler claims is answered by the app's handler for unexpected errors and
        raised again, as Starlette's error middleware does (the server logs it)."""
        handlers = self.app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                return await handler(request, exc)
        fallback = handlers.get(Exception) or handlers.get(500)
        if fallback is not None:
            await (await fallback(request, exc))(scope, receive, send)
        raise exc
