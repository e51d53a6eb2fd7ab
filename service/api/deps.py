"""``Annotated[..., Depends(...)]`` aliases so handlers declare what they need in one word."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.batcher import Batcher
from service.errors import APIError
from service.runtime import ModelRuntime
from service.settings import Settings

NOT_READY_DETAIL = "the model is not loaded and warmed up yet"

# The provider is ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its
# thread pool, which costs a thread hop per request.


def is_ready(request: Request) -> bool:
    return bool(getattr(request.app.state, "ready", False))


def require_ready(state) -> tuple[ModelRuntime, Batcher, Settings]:
    """The loaded model, its batcher and the settings, or a 503 while not ready."""
    if not getattr(state, "ready", False):
        raise APIError(503, "not_ready", NOT_READY_DETAIL, headers={"Retry-After": "1"})
    return state.runtime, state.batcher, state.settings


async def get_runtime(request: Request) -> ModelRuntime:
    return require_ready(request.app.state)[0]


RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]
