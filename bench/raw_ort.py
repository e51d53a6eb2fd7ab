"""Raw ONNX Runtime throughput: the ceiling the server is measured against.

The session is built by the service's own :func:`service.engine.loader.open_runtime` from the same
:class:`~service.settings.Settings` the server gets, so threads, spinning and graph optimisation
match exactly. The server runs ``workers x lanes`` ORT runs side by side (worker processes, and
batch lanes inside each), so the yardstick does too (``session.run`` releases the GIL).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from bench.models import normalized_batch
from service.settings import Settings


@dataclass(frozen=True)
class RawResult:
    batch: int
    sessions: int
    intra_op_threads: int
    images_per_s: float
    batch_latency_ms_p50: float
    runs: int

    def summary(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "sessions": self.sessions,
            "intra_op_threads": self.intra_op_threads,
            "images_per_s": round(self.images_per_s, 1),
            "batch_latency_ms_p50": round(self.batch_latency_ms_p50, 3),
            "runs": self.runs,
        }


def measure(
    settings: Settings, batch: int, *, duration_s: float = 3.0, warmup: int = 3, rounds: int = 3
) -> RawResult:
    """Images per second through ``session.run`` at ``batch``, over ``duration_s``."""
    from service.engine.loader import open_runtime
    from service.engine.runtime import find_model_file

    sessions = settings.resolved_workers * settings.lanes
    path = find_model_file(settings.model_path)
    runtimes = [open_runtime(settings, path) for _ in range(sessions)]
    spec = runtimes[0].spec
    x = normalized_batch(spec, batch)
    feed = {spec.input_name: x}
    outputs = [spec.output_name]
    for rt in runtimes:
        for _ in range(warmup):
            rt.session.run(outputs, feed)

    # The median of a few rounds, like the server's points (one window each, no best-of):
    # other tenants of a shared VM speed it up or slow it down by 10-15% from one second to
    # the next, and a best-of would turn a lucky second into the yardstick.
    results = sorted(
        (_round(runtimes, outputs, feed, batch, duration_s / rounds) for _ in range(rounds)),
        key=lambda r: r[0],
    )
    median = results[len(results) // 2]
    return RawResult(
        batch=batch,
        sessions=sessions,
        intra_op_threads=settings.resolved_intra_op_threads,
        images_per_s=median[0],
        batch_latency_ms_p50=median[1],
        runs=median[2],
    )


def _round(runtimes, outputs, feed, batch: int, duration_s: float) -> tuple[float, float, int]:
    """One timed round with every session busy; (images/s, p50 batch latency ms, runs)."""
    latencies: list[list[float]] = [[] for _ in runtimes]
    barrier = threading.Barrier(len(runtimes) + 1)
    stop_at = [0.0]

    def loop(index: int) -> None:
        session = runtimes[index].session
        mine = latencies[index]
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            session.run(outputs, feed)
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(len(runtimes))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    stop_at[0] = start + duration_s
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    runs = sum(len(lat) for lat in latencies)
    p50 = float(np.median(np.concatenate(latencies))) * 1000.0 if runs else float("nan")
    return runs * batch / elapsed, p50, runs
