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
    # Seconds per stage, filled in by the engine as the request goes, for the per-request
    # statistics and traces. A request whose rows ran in several batches counts its longest
    # wait and its longest run.
    decode_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    postprocess_s: float = 0.0
