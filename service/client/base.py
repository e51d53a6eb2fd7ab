"""What every transport shares: the answer for one image, the errors, and the retry loop.

A transport (:mod:`~service.client.rest`, :mod:`~service.client.grpc_oip`) turns one image
into a :class:`Classification` or raises :class:`RequestFailed` (this image failed, the run goes
on), :class:`Fatal` (no image can succeed: stop the run) or :class:`Unreachable` (no server
answers at that address).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: The longest wait a server's Retry-After (or gRPC pushback) can impose between two tries.
MAX_RETRY_DELAY_S = 30.0


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    index: int
    probability: float


@dataclass(frozen=True, slots=True)
class Classification:
    model_name: str
    model_version: str
    predictions: list[Prediction]

    def document(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, "version": self.model_version},
            "predictions": [
                {"label": p.label, "index": p.index, "probability": p.probability}
                for p in self.predictions
            ],
        }


class RequestFailed(Exception):
    """The server (or the client, before sending) refused or failed one request.

    ``status`` is the HTTP status or the gRPC status code's name, ``code`` the server's stable
    error code where the protocol carries one (``/v1`` and gRPC do, OIP REST does not), and
    ``retry_after_s`` is set when the server asked for a retry after that many seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        prefix = " ".join(str(p) for p in (self.status, self.code) if p is not None)
        return f"{prefix}: {self.message}" if prefix else self.message

    def document(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message}


class Fatal(RequestFailed):
    """A failure no other image can escape (unknown model, wrong endpoint): the run stops."""


class Unreachable(Exception):
    """Nothing answers at the server's address (refused, unknown host, TLS failure)."""


class Transport(Protocol):
    """One protocol's client; safe to call from several threads at once."""

    def resolve_model(self) -> None:
        """Find the model to call when the protocol needs a name and the user gave none."""

    def classify(self, name: str, data: bytes, content_type: str | None) -> Classification: ...

    def close(self) -> None: ...


#: How the client waits between tries (a test replaces it to run without waiting).
sleep: Callable[[float], None] = time.sleep


def with_retries(call: Callable[[], T], retries: int) -> T:
    """``call()``, tried again up to ``retries`` times while the server asks for a retry.

    Only failures that carry a Retry-After (HTTP 429/503, gRPC pushback) are retried, after the
    delay the server gave (at most :data:`MAX_RETRY_DELAY_S`): the server knows its queue.
    """
    attempt = 0
    while True:
        try:
            return call()
        except RequestFailed as exc:
            if exc.retry_after_s is None or attempt >= retries:
                raise
            attempt += 1
            sleep(min(max(exc.retry_after_s, 0.0), MAX_RETRY_DELAY_S))


def parse_classification(strings: list[str]) -> list[Prediction]:
    """Triton's classification strings ``"score:index:label"`` (a label may hold colons)."""
    out = []
    for text in strings:
        try:
            score, index, label = text.split(":", 2)
            out.append(Prediction(label=label, index=int(index), probability=float(score)))
        except ValueError:
            raise RequestFailed(f"the server sent a malformed classification {text!r}") from None
    return out


def only_ready_model(models: list[tuple[str, str]]) -> str:
    """The name to call from a repository index's (name, state) entries: the one READY model.

    Several versions of one model count once (the server picks its default version).
    """
    names = sorted({name for name, state in models if state == "READY"})
    if not names:
        raise Fatal("the server has no READY model; is it still loading? (or give --model)")
    if len(names) > 1:
        raise Fatal(
            f"the server serves {len(names)} models ({', '.join(names)}); pick one with --model"
        )
    return names[0]
