"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.api.deps import repository_of
from service.api.errors import error_example, error_response
from service.errors import NOT_READY_DETAIL, NotReady
from service.metrics import exposition_registry

router = APIRouter(tags=["operations"])


class Status(BaseModel):
    status: str = Field(examples=["ok"])


@router.get(
    "/healthz",
    summary="Liveness",
    description="Answers 200 while the process serves HTTP, loaded or not. Restart it if not.",
    response_model=Status,
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    summary="Readiness",
    description="200 while at least one model is loaded and warmed up; 503 before that, "
    "with no model loaded, and while shutting down. Route traffic only to ready instances.",
    response_model=Status,
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready"}}}},
        **error_example(503, "not_ready", NOT_READY_DETAIL, "Not loaded or warmed up yet."),
    },
)
async def readyz(request: Request) -> Response:
    if repository_of(request).ready:
        return JSONResponse({"status": "ready"})
    return error_response(request, NotReady())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Prometheus text exposition: HTTP traffic by route template and status, "
    "preprocess and inference latency histograms, batcher queue and batch size, model info. "
    "With several worker processes it aggregates all of them (prometheus_client multiprocess "
    "mode).",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": "# HELP sepconv_images_classified_total Images that went "
                    "through the model.\n# TYPE sepconv_images_classified_total counter\n"
                    "sepconv_images_classified_total 42.0\n"
                }
            }
        }
    },
)
async def metrics() -> Response:
    return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)
