"""What handlers need from the app, in one word each: the classifier seam, the settings.

The dependency providers are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency
in its thread pool, which costs a thread hop per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine.classifier import Classifier
from service.engine.context import RequestContext
from service.errors import NotReady
from service.logs import request_id_var
from service.settings import Settings
from service.tracing import current_trace


def is_ready(request: Request) -> bool:
    """Readiness for load balancers: loaded and warm, and not draining (service.drain)."""
    state = request.app.state
    return bool(getattr(state, "ready", False)) and not state.drain.draining


def require_ready(state) -> tuple[Classifier, Settings]:
    """The classifier and the settings, or :class:`NotReady` (503) until the model is warm."""
    if not getattr(state, "ready", False):
        raise NotReady()
    return state.classifier, state.settings


async def get_classifier(request: Request) -> Classifier:
    return require_ready(request.app.state)[0]


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]


def request_context(protocol: str) -> RequestContext:
    """The engine's context for the HTTP request being handled: its id (``X-Request-ID``, the
    adopted OIP ``id``, or a made one) and, while tracing is on, its span."""
    return RequestContext(
        request_id=request_id_var.get(), protocol=protocol, trace=current_trace.get()
    )
