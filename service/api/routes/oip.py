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
from service.api.deps import repository_of, request_context, settings_of
from service.api.errors import OIPRoute
from service.errors import NotReady
from service.logs import adopt_request_id, request_id_var
from service.protocols import oip, triton

router = APIRouter(tags=["Open Inference Protocol v2"], route_class=OIPRoute)


def _json(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        body, status_code=status_code, media_type=oip.JSON_CONTENT_TYPE, headers=headers
    )


# --- health and metadata ----------------------------------------------------------------------


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    document = oip.server_metadata(sepconv.__version__, triton.server_extensions())
    return _json(orjson.dumps(document))


@router.get("/v2/health/live", summary="Server liveness")
async def server_live() -> Response:
    return _json(b'{"live":true}')


@router.get(
    "/v2/health/ready",
    summary="Server readiness (200 with a model loaded, 503 with none or while draining)",
)
async def server_ready(request: Request) -> Response:
    if repository_of(request).ready:
        return _json(b'{"ready":true}')
    return _json(b'{"ready":false}', 503, NotReady().headers)


@router.get("/v2/models/{model_name}", summary="Model metadata")
@router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model metadata")
async def model_metadata(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    repository = repository_of(request)
    with repository.lease(model_name, model_version) as classifier:
        versions = [model_version] if model_version else repository.versions(model_name)
        return _json(orjson.dumps(oip.model_metadata(classifier.spec, versions)))


@router.get("/v2/models/{model_name}/ready", summary="Model readiness")
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model readiness")
async def model_ready(
    request: Request, model_name: str, model_version: str | None = None
) -> Response:
    # 404 for a model or version not served, 503 while it loads.
    repository_of(request).lookup(model_name, model_version)
    return _json(orjson.dumps({"name": model_name, "ready": True}))


# --- inference --------------------------------------------------------------------------------


@router.post("/v2/models/{model_name}/infer", summary="Inference")
@router.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference")
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    ctx = request_context("oip-rest")

    async def parse(spec) -> oip.InferRequest:
        # Called by the seam once the request is admitted: a refusal reads no body. The
        # body-size middleware has already refused anything over max_body_bytes.
        body = oip.decompress(
            await request.body(),
            request.headers.get("content-encoding"),
            max_bytes=settings_of(request).max_body_bytes,
        )
        req = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH), spec)
        adopt_request_id(req.id)
        ctx.request_id = request_id_var.get()
        return req

    answer = await repository_of(request).infer(parse, ctx, model_name, model_version)
    spec = answer.spec
    out, header_length = oip.build_response(
        model_name=spec.name,
        model_version=spec.version,
        request=answer.inputs,
        probs=answer.probs,
        labels=spec.labels,
    )
    if header_length is None:
        return _json(out)
    return Response(
        out,
        media_type=oip.BINARY_CONTENT_TYPE,
        headers={oip.HEADER_LENGTH: str(header_length)},
    )
