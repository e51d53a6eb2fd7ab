"""What handlers need from the app, in one word each: the model repository (the seam every
protocol calls for readiness, model lookup and inference), the settings, the request context.

The dependency providers are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency
in its thread pool, which costs a thread hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from service.engine.context import RequestContext
from service.engine.repository import ModelRepository
from service.logs import request_id_var
from service.settings import Settings
from service.tracing import current_trace


def repository_of(request: Request) -> ModelRepository:
    return request.app.state.repository


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
#: ``?model=`` and ``?version=`` on the ``/v1`` routes: which model (default: the default
#: model) and version (default: its highest loaded).
ModelQuery = Annotated[
    str | None, Query(description="Model name; default: the server's default model.")
]
VersionQuery = Annotated[
    str | None, Query(description="Model version; default: the highest loaded.")
]


def model_query(request: Request) -> tuple[str | None, str | None]:
    """``?model=`` and ``?version=`` read without FastAPI's dependency solving (hot routes)."""
    if not request.scope["query_string"]:
        return None, None  # most requests: no query to parse
    params = request.query_params
    return params.get("model") or None, params.get("version") or None


def request_context(protocol: str) -> RequestContext:
    """The engine's context for the HTTP request being handled: its id (``X-Request-ID``, the
    adopted OIP ``id``, or a made one) and, while tracing is on, its span."""
    return RequestContext(
        request_id=request_id_var.get(), protocol=protocol, trace=current_trace.get()
    )
