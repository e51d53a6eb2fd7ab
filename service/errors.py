"""One error shape for every failure: ``{"error": "<short_code>", "detail": "<sentence>"}``.

OIP routes (``/v2``) answer ``{"error": "<sentence>"}`` instead, as the protocol specifies.
Bad input is always a 4xx naming the problem; a 500 means a real server fault and is logged.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)


class APIError(StarletteHTTPException):
    """An error with a stable machine-readable code.

    It subclasses Starlette's HTTPException on purpose: FastAPI re-raises those untouched while it
    parses a body, where any other exception would be flattened into a generic 400.
    """

    def __init__(
        self,
        status_code: int,
        error: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.error = error


def error_body(error: str, detail: str) -> dict[str, str]:
    return {"error": error, "detail": detail}


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def error_response(
    request_path: str,
    status_code: int,
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": detail} if request_path.startswith("/v2") else error_body(error, detail)
    return Response(
        orjson.dumps(body), status_code=status_code, media_type="application/json", headers=headers
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    error = exc.error if isinstance(exc, APIError) else _code_for(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(request.url.path, exc.status_code, error, detail, exc.headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(request.url.path, 422, "invalid_parameter", _describe_validation(exc))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Only real server faults get here: every bad-input path raises an APIError first.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        request.url.path, 500, "internal_error", "the server failed to handle this request"
    )


async def _image_error(request: Request, exc: Exception) -> Response:
    from service.preprocess import ImageTooLargeError

    if isinstance(exc, ImageTooLargeError):
        return error_response(request.url.path, 413, "image_too_large", str(exc))
    return error_response(request.url.path, 400, "invalid_image", str(exc))


async def _batcher_error(request: Request, exc: Exception) -> Response:
    from service.batcher import InvalidInputError, QueueFullError, RequestTimeoutError

    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(exc.retry_after_s)}
        return error_response(request.url.path, 429, "overloaded", str(exc), headers)
    if isinstance(exc, InvalidInputError):
        return error_response(request.url.path, 400, "invalid_input", str(exc))
    if isinstance(exc, RequestTimeoutError):
        return error_response(request.url.path, 504, "timeout", str(exc))
    # BatchFailedError: the model run failed, which is the server's fault, not the client's.
    log.error("inference failed on %s: %s", request.url.path, exc)
    return error_response(request.url.path, 500, "inference_failed", str(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler; routers (the /v2 ones too) just raise."""
    from service.batcher import BatcherError
    from service.preprocess import ImageError

    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(BatcherError, _batcher_error)
    app.add_exception_handler(Exception, _unexpected)


#: Reusable OpenAPI response entries with the error body as example.
def error_example(status: int, error: str, detail: str, description: str) -> dict:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"example": error_body(error, detail)}},
        }
    }
