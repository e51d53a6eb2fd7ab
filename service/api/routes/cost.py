"""``GET /v1/cost``: what the served network costs, counted from its own graph.

The static report is computed once from the bytes the session was built from; the
measured side runs only on ``?profile=true``, in a private ONNX Runtime session on a worker
thread, one profile at a time.
"""

from __future__ import annotations

import threading
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from sepconv.cost import (
    DEFAULT_PROFILE_RUNS,
    MAX_PROFILE_RUNS,
    CostError,
    CostReport,
    profile_model,
    render,
)
from service.api.deps import ModelQuery, RepositoryDep, VersionQuery
from service.api.errors import error_example
from service.engine.runtime import ModelLoadError, ModelRuntime
from service.errors import NOT_READY_DETAIL, InvalidRequest, NotAcceptable, Overloaded, ServiceError

router = APIRouter(tags=["model"])

Format = Literal["json", "markdown", "text"]
_MEDIA = {"json": "application/json", "markdown": "text/markdown", "text": "text/plain"}
_BY_MEDIA = {
    "application/json": "json",
    "text/markdown": "markdown",
    "text/plain": "text",
    "application/*": "json",
    "text/*": "markdown",
    "*/*": "json",
}
# One profile at a time: each one saturates the cores it is given for a second or more.
_profile_lock = threading.Lock()


def negotiate(fmt: str | None, accept: str | None) -> Format:
    """``format`` wins; otherwise the Accept entry with the highest q we can serve; JSON default."""
    if fmt is not None:
        if fmt not in _MEDIA:
            raise InvalidRequest(
                f"format must be json, markdown or text, got {fmt!r}", code="invalid_format"
            )
        return fmt  # type: ignore[return-value]
    if not accept:
        return "json"
    ranked = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media.lower() in _BY_MEDIA and q > 0:
            ranked.append((-q, position, _BY_MEDIA[media.lower()]))
    if not ranked:
        raise NotAcceptable(
            f"cannot answer Accept: {accept}; this endpoint serves application/json, "
            "text/markdown and text/plain"
        )
    return min(ranked)[2]


@router.get(
    "/v1/cost",
    summary="Compute cost of a served model",
    description="For the default model, or the one `model` (and `version`) name: exact "
    "mult-adds and parameters of every Conv/Gemm/MatMul layer, counted from "
    "the served ONNX graph with shape inference at batch 1; each depthwise + pointwise pair "
    "against the standard conv it replaces (ratio checked exactly against 1/N + 1/Dk^2); "
    "totals, the same network with full convs, and shares per layer kind. With "
    "`profile=true`, also time per layer kind from ONNX Runtime's profiler. JSON by default; "
    "`format=markdown|text` or `Accept: text/markdown` gives a readable table.",
    response_model=CostReport,
    responses={
        200: {"content": {"text/markdown": {}, "text/plain": {}}},
        **error_example(400, "invalid_format", "format must be json, markdown or text", "Bad."),
        **error_example(404, "not_found", "unknown model 'resnet'", "No such model."),
        **error_example(429, "profile_busy", "a profile is already running", "One at a time."),
        **error_example(503, "not_ready", NOT_READY_DETAIL, "Model not loaded yet."),
    },
)
async def get_cost(
    repository: RepositoryDep,
    model: ModelQuery = None,
    version: VersionQuery = None,
    format: Annotated[
        str | None, Query(description="json, markdown or text; overrides Accept.")
    ] = None,
    profile: Annotated[bool, Query(description="Also profile with ONNX Runtime.")] = False,
    runs: Annotated[
        int, Query(ge=1, le=MAX_PROFILE_RUNS, description="Profiled inferences (median).")
    ] = DEFAULT_PROFILE_RUNS,
    accept: Annotated[str | None, Header()] = None,
):
    fmt = negotiate(format, accept)
    with repository.lease(model, version) as classifier:
        return await _cost(classifier.runtime, fmt, profile, runs)


async def _cost(runtime: ModelRuntime, fmt: Format, profile: bool, runs: int) -> Response:
    try:
        report = await run_in_threadpool(runtime.cost_report)
    except CostError as exc:
        raise ServiceError(f"cannot cost the served model: {exc}", code="cost_unavailable") from exc
    if profile:
        if not _profile_lock.acquire(blocking=False):
            raise Overloaded(
                "a profile is already running; retry when it finishes",
                code="profile_busy",
                retry_after_s=2,
            )

        def measure():
            return profile_model(
                runtime.model_bytes(),
                report,
                runs=runs,
                intra_op_threads=runtime.intra_op_threads,
                providers=runtime.providers,
            )

        try:
            measured = await run_in_threadpool(measure)
        except ModelLoadError as exc:
            raise ServiceError(str(exc), code="model_changed", status_code=409) from exc
        finally:
            _profile_lock.release()
        report = report.model_copy(update={"profile": measured})
    headers = {"Vary": "Accept"}
    if fmt == "json":
        return Response(report.model_dump_json(), media_type="application/json", headers=headers)
    return Response(
        render(report, fmt), media_type=f"{_MEDIA[fmt]}; charset=utf-8", headers=headers
    )
