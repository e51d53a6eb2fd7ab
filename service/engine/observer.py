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

    def refusal_held(self, seconds: float) -> None:
        """A refusal waits ``seconds`` for its turn before it is answered (a refusal storm)."""

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

    def batch_finished(
        self,
        batch_id: int,
        started: float,
        ended: float,
        rows: Sequence[tuple[RequestContext | None, float]],
        error: str | None,
    ) -> None:
        """Batch ``batch_id`` ran from ``started`` to ``ended`` (``time.monotonic()``), or
        failed with ``error``; ``rows`` are its images' (context, enqueue time)."""

    def request_finished(
        self, ctx: RequestContext, started: float, seconds: float, error: BaseException | None
    ) -> None:
        """A request left the Classifier seam ``seconds`` after it came in at ``started``, with
        probabilities or ``error``; ``ctx`` holds its stage times."""


class FanOut(EngineObserver):
    """Every hook of every observer in ``observers``, in order (metrics and traces)."""

    def __init__(self, *observers: EngineObserver) -> None:
        self.observers = observers


def _fan_out(name: str):
    def hook(self: FanOut, *args):
        for observer in self.observers:
            getattr(observer, name)(*args)

    hook.__name__ = name
    return hook


for _name in [n for n in vars(EngineObserver) if not n.startswith("_")]:
    setattr(FanOut, _name, _fan_out(_name))


#: The default: hooks cost one no-op call.
NULL_OBSERVER = EngineObserver()


class RepositoryObserver:
    """What the model repository reports: loads, failed loads, unloads (metrics, logs)."""

    def model_loaded(self, name: str, version: str, seconds: float, runtime) -> None:
        """``name`` version ``version`` is loaded, warm and serving; it took ``seconds``;
        ``runtime`` (:class:`~service.engine.runtime.ModelRuntime`) says what runs it."""

    def model_load_failed(self, name: str, version: str, reason: str) -> None:
        """A load of ``name`` version ``version`` failed; whatever served before still does."""

    def model_unloaded(self, name: str, version: str) -> None:
        """``name`` version ``version`` answered its last request and released its session."""


NULL_REPOSITORY_OBSERVER = RepositoryObserver()
