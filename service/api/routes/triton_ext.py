"""Triton's extensions to the Open Inference Protocol over HTTP: model configuration,
statistics and the model repository (index, load, unload), the endpoints ``tritonclient`` and
perf_analyzer use besides the OIP core. The documents are built in
:mod:`service.protocols.triton`, the same ones the gRPC servicer sends; the statistics are read
from the engine's metrics, the repository's state from the repository (the seam).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import repository_of, settings_of
from service.api.errors import OIPRoute
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
    with repository_of(request).lease(model_name, model_version) as classifier:
        provider = classifier.runtime.providers[0]
        return _json(triton.served_model_config(classifier.spec, settings_of(request), provider))


@router.get("/v2/models/stats", summary="Statistics of every model (Triton)")
@router.get("/v2/models/{model_name}/stats", summary="Model statistics (Triton)")
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats", summary="Model statistics (Triton)"
)
async def stats(
    request: Request, model_name: str | None = None, model_version: str | None = None
) -> Response:
    repository = repository_of(request)
    if model_name is None:
        specs = [classifier.spec for classifier in repository.loaded()]
    else:
        with repository.lease(model_name, model_version) as classifier:
            specs = [classifier.spec]
    return _json(triton.model_statistics(triton.statistics_of(specs, inference_counters())))


@router.post("/v2/repository/index", summary="Model repository index (Triton)")
async def repository_index(request: Request) -> Response:
    """Every model and version with its state (READY, LOADING, UNLOADING, UNAVAILABLE and
    why); with several workers, READY once every worker has it. Body ``{"ready": true}``
    (optional) lists only ready models."""
    ready_only = triton.index_request(await request.body())
    entries = repository_of(request).index(ready_only=ready_only)
    return _json([entry.document() for entry in entries])


@router.post("/v2/repository/models/{model_name}/load", summary="Load a model (Triton)")
async def load(request: Request, model_name: str) -> Response:
    """Read the model's folder again and serve what its version policy selects: a new version
    is loaded, checked and warmed up beside the old one, then takes its traffic; the old one
    finishes its requests and is unloaded. Answers once every worker process has done it; 400
    with the reason if the load failed (what served before still serves)."""
    triton.repository_request(await request.body(), "load")
    await repository_of(request).load(model_name)
    return _json({})


@router.post("/v2/repository/models/{model_name}/unload", summary="Unload a model (Triton)")
async def unload(request: Request, model_name: str) -> Response:
    """Every version of the model finishes its requests and releases its memory; the model
    stays in the index as UNAVAILABLE until loaded again."""
    triton.repository_request(await request.body(), "unload")
    await repository_of(request).unload(model_name)
    return _json({})
