"""Triton's extensions to the Open Inference Protocol over HTTP: model configuration,
statistics and the model repository index, the endpoints ``tritonclient`` and perf_analyzer read
besides the OIP core. The documents are built in :mod:`service.protocols.triton`, the same ones
the gRPC servicer sends; the statistics are read from the engine's metrics.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import require_ready
from service.api.errors import OIPRoute
from service.api.routes.oip import check_model
from service.errors import InvalidRequest
from service.metrics import inference_counters
from service.protocols import oip, triton

router = APIRouter(tags=["Triton extensions"], route_class=OIPRoute)


def _json(document) -> Response:
    return Response(orjson.dumps(document), media_type=oip.JSON_CONTENT_TYPE)


@router.get("/v2/models/{model_name}/config", summary="Model configuration (Triton)")
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/config",
    summary="Model configuration (Triton)",
)
async def config(request: Request, model_name: str, model_version: str | None = None) -> Response:
    spec = check_model(request, model_name, model_version)
    classifier, settings = require_ready(request.app.state)
    provider = classifier.runtime.providers[0]
    return _json(triton.served_model_config(spec, settings, provider))


@router.get("/v2/models/stats", summary="Statistics of every model (Triton)")
@router.get("/v2/models/{model_name}/stats", summary="Model statistics (Triton)")
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats", summary="Model statistics (Triton)"
)
async def stats(
    request: Request, model_name: str | None = None, model_version: str | None = None
) -> Response:
    if model_name is None:
        spec = require_ready(request.app.state)[0].spec  # every model: the one served here
    else:
        spec = check_model(request, model_name, model_version)
    counters = triton.model_stats_from(inference_counters())
    return _json(triton.model_statistics(spec, counters))


@router.post("/v2/repository/index", summary="Model repository index (Triton)")
async def repository_index(request: Request) -> Response:
    """Body ``{"ready": true}`` (optional) lists only ready models."""
    body = await request.body()
    ready_only = False
    if body.strip():
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidRequest("repository index request must be a JSON object")
        ready_only = document.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidRequest("'ready' must be true or false")
    state = request.app.state
    classifier = getattr(state, "classifier", None)
    if classifier is None:
        return _json([])
    ready = bool(getattr(state, "ready", False))
    return _json(triton.repository_index(classifier.spec, ready=ready, ready_only=ready_only))
