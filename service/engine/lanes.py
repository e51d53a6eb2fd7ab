"""The process's inference capacity: ``count`` lanes, shared by every loaded model's batcher,
and whether a request is alone on the machine.

Each model and version has its own batcher (its own queue and batches), but they all run on the
same cores. If each batcher had its own threads, two busy models would run two batches at once,
each with every intra-op thread, and oversubscribe the cores; and each model's admission control
would predict its wait from its own queue alone, blind to the other model's work ahead of it on
the same cores. So a process has one :class:`Lanes`: at most ``count`` batches run at once,
whatever their model, in one thread pool, and the predicted wait of any request counts the
queued work of every model (:meth:`Lanes.seconds_to_drain`).

A request alone on the machine (:meth:`Lanes.alone`: the only one in progress in this process,
and no other worker process has one, as their flags on a :class:`BusyBoard` say) may run on
every core (``SEPCONV_LONE_REQUEST_THREADS``), where a loaded server keeps each lane to its own
thread: the lowest latency for one request and the most throughput under load, without
choosing between them.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


class BusyBoard:
    """One byte per worker process in a shared file: 1 while that worker has a request in
    progress. A worker writes only its own byte, so no lock is needed."""

    def __init__(self, path: Path, slot: int, slots: int) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"worker slot {slot} outside 0..{slots - 1}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < slots:
                os.ftruncate(fd, slots)
            self._map = mmap.mmap(fd, slots)
        finally:
            os.close(fd)
        self.slot = slot
        self.slots = slots
        self.set(False)

    def set(self, busy: bool) -> None:
        self._map[self.slot] = 1 if busy else 0

    def others_busy(self) -> bool:
        flags = self._map[: self.slots]
        return any(flag for i, flag in enumerate(flags) if i != self.slot)

    def close(self) -> None:
        self.set(False)
        self._map.close()


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
        #: Requests in progress in this process (between admission and answer), every model.
        self.in_progress = 0
        #: The other workers' flags; None in a single process (no other worker to ask).
        self.board: BusyBoard | None = None
        self._sources: set[WorkSource] = set()
        self._closed = False

    def enter(self) -> None:
        """A request is in progress (the classifier calls it; pair with :meth:`leave`)."""
        self.in_progress += 1
        if self.in_progress == 1 and self.board is not None:
            self.board.set(True)

    def leave(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0 and self.board is not None:
            self.board.set(False)

    def alone(self) -> bool:
        """True when one request is in progress in this process and none in any other worker:
        a batch for it may use every core."""
        return self.in_progress == 1 and (self.board is None or not self.board.others_busy())

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
            if self.board is not None:
                self.board.close()
