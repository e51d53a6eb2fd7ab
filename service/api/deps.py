"""``Annotated[..., Depends(...)]`` aliases so handlers declare what they need in one word."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.batcher import Batcher
from service.errors import APIError
from service.runtime import ModelRuntime
from service.settings import Settings

NOT_READY_DETAIL = "the model is not loaded and warmed up yet"

# The providers are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its
# thread pool, which costs a thread hop per dependency per request on the hot path.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def is_ready(request: Request) -> bool:
    return bool(getattr(request.app.state, "ready", False))


def require_ready(state) -> tuple[ModelRuntime, Batcher, Settings]:
    """The loaded model, its batcher and the settings, or a 503 while not ready."""
    if not getattr(state, "ready", False):
        raise APIError(503, "not_ready", NOT_READY_DETAIL, headers={"Retry-After": "1"})
    return state.runtime, state.batcher, state.settings


async def get_runtime(request: Request) -> ModelRuntime:
    state = request.app.state
    if not getattr(state, "ready", False):
        raise APIError(503, "not_ready", NOT_READY_DETAIL, headers={"Retry-After": "1"})
    return state.runtime


async def get_batcher(request: Request) -> Batcher:
    state = request.app.state
    if not getattr(state, "ready", False):
        raise APIError(503, "not_ready", NOT_READY_DETAIL, headers={"Retry-After": "1"})
    return state.batcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
