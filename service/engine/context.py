"""Per-request facts that travel with a request through the engine, whatever its protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class RequestContext:
    request_id: str | None = None
    #: ``v1``, ``oip-rest``, ``oip-grpc``: for logs and traces.
    protocol: str = ""
    #: ``time.monotonic()`` after which nobody waits for the answer any more (None: no deadline).
    deadline: float | None = None
    #: Opaque to the engine: the tracing integration keeps its span here.
    trace: Any = None
