"""The process's inference capacity: ``count`` lanes, shared by every loaded model's batcher.

Each model and version has its own batcher (its own queue and batches), but they all run on the
same cores. If each batcher had its own threads, two busy models would run two batches at once,
each with every intra-op thread, and oversubscribe the cores; and each model's admission control
would predict its wait from its own queue alone, blind to the other model's work ahead of it on
the same cores. So a process has one :class:`Lanes`: at most ``count`` batches run at once,
whatever their model, in one thread pool, and the predicted wait of any request counts the
queued work of every model (:meth:`Lanes.seconds_to_drain`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Make the calling (inference) thread yield to the event loop when both want a core.

    Linux gives each thread its own nice value; with one ORT thread per worker, ORT computes on
    this thread, so refusals and decoding on the event loop are not queued behind a batch.
    """
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run as is
        log.warning("cannot lower the inference thread's priority: %s", exc)


class WorkSource(Protocol):
    """Something that has work queued for the lanes (a model's admission control)."""

    def queued_seconds(self) -> float:
        """Model seconds of the work it has queued, running or admitted."""
        ...


class Lanes:
    """``count`` batches at once over every model, in one thread pool of ``count`` threads."""

    def __init__(self, count: int = 1, *, inference_nice: int = 0) -> None:
        if count < 1:
            raise ValueError("lanes must be at least 1")
        self.count = count
        self._free = asyncio.Semaphore(count)
        self.executor = ThreadPoolExecutor(
            max_workers=count,
            thread_name_prefix="sepconv-infer",
            initializer=lower_thread_priority,
            initargs=(inference_nice,),
        )
        #: Images in batches running now, over every model.
        self.running = 0
        self._sources: set[WorkSource] = set()
        self._closed = False

    async def acquire(self) -> None:
        await self._free.acquire()

    def release(self) -> None:
        self._free.release()

    def add_source(self, source: WorkSource) -> None:
        self._sources.add(source)

    def remove_source(self, source: WorkSource) -> None:
        self._sources.discard(source)

    def queued_seconds(self) -> float:
        """Model seconds of work queued, running or admitted, over every model."""
        return sum(source.queued_seconds() for source in self._sources)

    def seconds_to_drain(self) -> float:
        """Predicted seconds until the work of every model now queued is through the lanes."""
        return self.queued_seconds() / self.count

    async def close(self) -> None:
        """Wait for running batches (off the event loop, which keeps serving) and stop."""
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self.executor.shutdown, wait=True)
