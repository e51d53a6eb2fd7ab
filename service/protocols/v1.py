"""The ``/v1`` JSON protocol: query parsing, the classify response and the error body.

Responses are built with orjson directly, no pydantic round trip per request; the pydantic
models in :mod:`service.api.routes.classify` describe the same shapes for the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from sepconv.spec import ModelSpec
from service.engine.postprocess import top_k_rows
from service.errors import InvalidParameter, ServiceError, UnsupportedMediaType

DEFAULT_TOP_K = 5
SUPPORTED_HINT = "send multipart/form-data with field `file`, or the image as the raw body"


@dataclass(frozen=True, slots=True)
class Images:
    """A ``/v1/classify`` request for the engine: encoded images and their file names."""

    images: list[bytes]
    names: list[str]
    tensor: None = None


def parse_top_k(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_TOP_K
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise InvalidParameter(f"query.top_k: must be an integer >= 1, got {raw!r}")
    return k


def media_type(value: str | None) -> str:
    """``Content-Type`` without parameters, lower case; empty when absent."""
    return (value or "").split(";", 1)[0].strip().lower()


def unsupported(media: str) -> UnsupportedMediaType:
    shown = media or "(none)"
    return UnsupportedMediaType(f"content type {shown} is not supported; {SUPPORTED_HINT}")


def classify_response(spec: ModelSpec, probs: np.ndarray, names: Sequence[str], k: int) -> bytes:
    """One result per image, in request order, each with its ``k`` most probable labels."""
    results = [
        {"filename": names[i] if names else None, "predictions": predictions}
        for i, predictions in enumerate(top_k_rows(probs, k, spec.labels))
    ]
    return orjson.dumps({"model": {"name": spec.name, "version": spec.version}, "results": results})


def error_document(code: str, detail: str) -> dict[str, str]:
    return {"error": code, "detail": detail}


def error_body(exc: ServiceError) -> bytes:
    """The protocol's error shape: ``{"error": "<code>", "detail": "<sentence>"}``."""
    return orjson.dumps(error_document(exc.code, exc.detail))
