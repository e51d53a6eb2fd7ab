"""HTTP error mapping: every failure becomes a :class:`~service.errors.ServiceError`, answered in
the body of the protocol the request speaks.

The protocol is that of the router the request matched (its routes are a :class:`ProtocolRoute`
subclass); a path no route matched goes by its prefix, so an OIP client gets OIP errors even for
a mistyped URL. Framework errors (routing 404/405, FastAPI validation) are translated here too,
so handlers and the engine only ever raise service errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.errors import InvalidParameter, ServiceError
from service.protocols import oip, v1

log = logging.getLogger(__name__)

#: protocol -> (error body encoder, media type)
ENCODERS: dict[str, Callable[[ServiceError], bytes]] = {
    "v1": v1.error_body,
    "oip": oip.error_body,
}


class ProtocolRoute(APIRoute):
    protocol = "v1"


class OIPRoute(ProtocolRoute):
    protocol = "oip"


def protocol_of(request: Request) -> str:
    route = request.scope.get("route")
    if isinstance(route, ProtocolRoute):
        return route.protocol
    return "oip" if request.url.path.startswith("/v2") else "v1"


def error_response(request: Request, exc: ServiceError) -> Response:
    if exc.status_code >= 500:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, exc.code, exc.detail)
    body = ENCODERS[protocol_of(request)](exc)
    return Response(
        body, status_code=exc.status_code, media_type="application/json", headers=exc.headers
    )


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _service_error(request: Request, exc: ServiceError) -> Response:
    return error_response(request, exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    error = ServiceError(detail, code=_code_for(exc.status_code), status_code=exc.status_code)
    response = error_response(request, error)
    response.headers.update(exc.headers or {})
    return response


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(request, InvalidParameter(_describe_validation(exc)))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Only real server faults get here: every bad-input path raises a ServiceError first.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, ServiceError("the server failed to handle this request"))


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler; routers just raise."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


def error_example(status: int, error: str, detail: str, description: str) -> dict:
    """A reusable OpenAPI response entry with the ``/v1`` error body as example."""
    return {
        status: {
            "description": description,
            "content": {"application/json": {"example": v1.error_document(error, detail)}},
        }
    }
