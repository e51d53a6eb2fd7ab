"""Open Inference Protocol v2 over HTTP (KServe / Triton), so ``tritonclient`` and other OIP
clients talk to the same server, model and batcher as ``/v1/classify``.

The handlers read the raw body, translate it with the codec in :mod:`service.protocols.oip`,
call the Classifier seam and answer raw bytes: no pydantic round trip on the hot path. Errors are
raised as service errors; :mod:`service.api.errors` answers them with the protocol's
``{"error": "<sentence>"}`` body.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

import sepconv
from sepconv.spec import ModelSpec
from service.api.deps import is_ready, request_context, require_ready
from service.api.errors import OIPRoute
from service.errors import NotFound, NotReady
from service.logs import adopt_request_id
from service.protocols import oip, triton

router = APIRouter(tags=["Open Inference Protocol v2"], route_class=OIPRoute)


def _json(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        body, status_code=status_code, media_type=oip.JSON_CONTENT_TYPE, headers=headers
    )


def check_model(request: Request, model_name: str, model_version: str | None) -> ModelSpec:
    """The served model's spec if the URL names it; 503 until the model is loaded and warm."""
    classifier, _ = require_ready(request.app.state)
    spec = classifier.spec
    if model_name != spec.name:
        raise NotFound(f"unknown model {model_name!r}; this server serves {spec.name!r}")
    if model_version is not None and model_version != spec.version:
        raise NotFound(
            f"model {model_name!r} has no version {model_version!r}; it has {spec.version!r}"
        )
    return spec


# --- health and metadata ----------------------------------------------------------------------


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    document = oip.server_metadata(sepconv.__version__, triton.server_extensions())
    return _json(orjson.dumps(document))


@router.get("/v2/health/live", summary="Server liveness")
async def server_live() -> Response:
    return _json(b'{"live":true}')


@router.get("/v2/health/ready", summary="Server readiness (200 ready, 503 not yet)")
async def server_ready(request: Request) -> Response:
    if is_ready(request):
        return _json(b'{"ready":true}')
    return _json(b'{"ready":false}', 503, NotReady().headers)


@router.get("/v2/models/{model_name}", summary="Model metadata")
@router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model metadata")
async def model_metadata(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    spec = check_model(request, model_name, model_version)
    return _json(orjson.dumps(oip.model_metadata(spec)))


@router.get("/v2/models/{model_name}/ready", summary="Model readiness")
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model readiness")
async def model_ready(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    check_model(request, model_name, model_version)
    return _json(orjson.dumps({"name": model_name, "ready": True}))


# --- inference --------------------------------------------------------------------------------


@router.post("/v2/models/{model_name}/infer", summary="Inference")
@router.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference")
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    spec = check_model(request, model_name, model_version)
    classifier, settings = require_ready(request.app.state)
    # Refused before the body is read: a refusal must cost next to nothing under overload.
    await classifier.admit()
    # The body-size middleware has already refused anything over max_body_bytes.
    body = oip.decompress(
        await request.body(),
        request.headers.get("content-encoding"),
        max_bytes=settings.max_body_bytes,
    )
    req = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), spec)
    oip.check_rows(req, classifier.max_rows)
    adopt_request_id(req.id)
    ctx = request_context("oip-rest")
    if req.images is not None:
        # The same decode and preprocessing as /v1/classify, by the same seam.
        probs = await classifier.classify_images(req.images, ctx=ctx)
    else:
        probs = await classifier.classify_tensor(req.tensor, ctx)
    out, header_length = oip.build_response(
        model_name=spec.name,
        model_version=spec.version,
        request=req,
        probs=probs,
        labels=spec.labels,
    )
    if header_length is None:
        return _json(out)
    return Response(
        out,
        media_type=oip.BINARY_CONTENT_TYPE,
        headers={oip.HEADER_LENGTH: str(header_length)},
    )
