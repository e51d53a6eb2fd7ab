"""Open Inference Protocol v2 over HTTP (KServe / Triton), so ``tritonclient`` and other OIP
clients talk to the same server, model and batcher as ``/v1/classify``.

The handlers read the raw body and answer raw bytes: no pydantic round trip on the hot path. The
wire format lives in :mod:`service.oip`; here are only I/O, the batcher and the error mapping.
Errors are ``{"error": "<sentence>"}``, as the protocol specifies.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import oip
from service.api.deps import NOT_READY_DETAIL, is_ready
from service.pipeline import preprocess_images_async
from service.postprocess import softmax
from service.spec import ModelSpec

router = APIRouter(tags=["Open Inference Protocol v2"])

try:
    _SERVER_VERSION = version("sepconv-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    _SERVER_VERSION = "0"


def _json(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        body, status_code=status_code, media_type=oip.JSON_CONTENT_TYPE, headers=headers
    )


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    if status_code == 503 and headers is None:
        # Here 503 only ever means "not loaded or warm yet": a retry soon succeeds.
        headers = {"Retry-After": "1"}
    return _json(oip.error_body(message), status_code, headers)


def _check_model(request: Request, model_name: str, model_version: str | None) -> ModelSpec:
    """The served model's spec if the URL names it; 503 until the model is loaded and warm."""
    if not is_ready(request):
        raise oip.OIPError(NOT_READY_DETAIL, 503)
    spec = request.app.state.runtime.spec
    if model_name != spec.name:
        raise oip.OIPError(f"unknown model {model_name!r}; this server serves {spec.name!r}", 404)
    if model_version is not None and model_version != spec.version:
        raise oip.OIPError(
            f"model {model_name!r} has no version {model_version!r}; it has {spec.version!r}", 404
        )
    return spec


# --- health and metadata ----------------------------------------------------------------------


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return _json(orjson.dumps(oip.server_metadata(_SERVER_VERSION)))


@router.get("/v2/health/live", summary="Server liveness")
async def server_live() -> Response:
    return _json(b'{"live":true}')


@router.get("/v2/health/ready", summary="Server readiness (200 ready, 503 not yet)")
async def server_ready(request: Request) -> Response:
    if is_ready(request):
        return _json(b'{"ready":true}')
    return _json(b'{"ready":false}', 503, {"Retry-After": "1"})


@router.get("/v2/models/{model_name}", summary="Model metadata")
@router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model metadata")
async def model_metadata(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    try:
        spec = _check_model(request, model_name, model_version)
    except oip.OIPError as exc:
        return _error(exc.status_code, str(exc))
    return _json(orjson.dumps(oip.model_metadata(spec)))


@router.get("/v2/models/{model_name}/ready", summary="Model readiness")
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model readiness")
async def model_ready(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    try:
        _check_model(request, model_name, model_version)
    except oip.OIPError as exc:
        return _error(exc.status_code, str(exc))
    return _json(orjson.dumps({"name": model_name, "ready": True}))


# --- inference --------------------------------------------------------------------------------


@router.post("/v2/models/{model_name}/infer", summary="Inference")
@router.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference")
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    state = request.app.state
    settings = state.settings
    try:
        spec = _check_model(request, model_name, model_version)
        # The body-size middleware has already refused anything over max_body_bytes.
        body = await request.body()
        body = oip.decompress(
            body, request.headers.get("content-encoding"), max_bytes=settings.max_body_bytes
        )
        req = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), spec)
        if req.batch_size > settings.max_queue_size:
            raise oip.OIPError(
                f"{req.batch_size} rows in one request; the server queues at most "
                f"{settings.max_queue_size} (SEPCONV_MAX_QUEUE_SIZE)",
                413,
            )
        if req.images is not None:
            # The same decode and preprocessing as /v1/classify, by the same function.
            batch = await preprocess_images_async(
                req.images,
                spec,
                max_pixels=settings.max_pixels,
                inline_max_pixels=settings.inline_decode_max_pixels,
            )
            rows = list(batch)
        else:
            rows = list(req.tensor)  # row views, no copy
        logits = await _submit_all(state.batcher, rows)
    except oip.OIPError as exc:
        return _error(exc.status_code, str(exc))
    # Image and batcher errors propagate to the app's handlers (service/errors.py), which give
    # /v2 paths the OIP body {"error": ...} with the same status codes as /v1.

    out, header_length = oip.build_response(
        model_name=spec.name,
        model_version=spec.version,
        request=req,
        probs=softmax(np.stack(logits)),
        labels=spec.labels,
    )
    if header_length is None:
        return _json(out)
    return Response(
        out,
        media_type=oip.BINARY_CONTENT_TYPE,
        headers={oip.HEADER_LENGTH: str(header_length)},
    )


async def _submit_all(batcher, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Submit every row to the shared batcher, so OIP rows batch with ``/v1`` images.

    If one row fails, the others are cancelled: the batcher drops cancelled rows instead of
    spending model time on an answer nobody will read.
    """
    if len(rows) == 1:
        return [await batcher.submit(rows[0])]
    tasks = [asyncio.ensure_future(batcher.submit(row)) for row in rows]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
