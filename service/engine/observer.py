"""What the engine reports as it works, to whoever listens (metrics, traces, tests).

The engine calls these hooks at each stage; the base class does nothing, so the engine runs and
is tested without Prometheus. :class:`service.metrics.PrometheusObserver` records them.
Hooks run on the event loop or an inference thread and must be cheap and never raise.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.engine.context import RequestContext


class EngineObserver:
    def preprocessed(self, seconds: float) -> None:
        """One image was decoded and preprocessed in ``seconds``."""

    def queue_depth(self, depth: int) -> None:
        """Images now waiting in the batch queue."""

    def rejected(self, reason: str) -> None:
        """One image was refused or given up on (``queue_full``, ``timeout``, ...)."""

    def batch_started(
        self,
        size: int,
        queue_waits: Sequence[float],
        contexts: Sequence[RequestContext | None],
    ) -> None:
        """A batch of ``size`` images left the queue; image ``i`` waited ``queue_waits[i]``
        seconds and belongs to the request ``contexts[i]`` (None when submitted without one)."""

    def inference(self, seconds: float, batch_size: int) -> None:
        """One ONNX Runtime run over ``batch_size`` images took ``seconds``."""

    def classified(self, images: int) -> None:
        """``images`` results were handed back to their callers."""


#: The default: hooks cost one no-op call.
NULL_OBSERVER = EngineObserver()
