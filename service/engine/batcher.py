"""Dynamic batching: many concurrent requests, one ORT run.

Modelled on Ray Serve's ``serve/batching.py``: callers put ``(item, future)`` on one asyncio queue
and await the future; one worker task collects items until the batch is full or the wait deadline
(monotonic clock, started at the first item's arrival) passes, runs the model once in a worker
thread, checks the result count, and resolves each future in order. A failed batch fails every
future in it. Cancelled futures (the caller timed out or disconnected) are skipped.

Two choices differ from Ray Serve:
- An idle queue never waits: a lone request runs at once, so concurrency 1 pays no
  ``max_wait``. Under load the queue fills while the previous batch runs, so batches form
  without waiting anyway.
- The queue is bounded and a full queue answers at once (429 + Retry-After) instead of letting
  latency grow without limit (BentoML sheds load the same way). The batcher also measures its
  drain rate (images per second, from recent batches), which admission control
  (:mod:`service.engine.admission`) turns into a predicted wait before a request is decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from service.engine.context import RequestContext
from service.engine.lanes import Lanes
from service.engine.observer import NULL_OBSERVER, EngineObserver
from service.errors import DeadlineExceeded, InferenceFailed, InvalidInput, Overloaded

log = logging.getLogger(__name__)

#: Weight of the newest batch in the per-image service time estimate.
EWMA_WEIGHT = 0.2


def retry_after(seconds_to_drain: float) -> int:
    """Whole seconds until a backlog has likely drained (at least 1: HTTP wants an integer, and
    0 would invite an immediate retry storm)."""
    return max(1, math.ceil(seconds_to_drain))


class QueueFullError(Overloaded):
    """The queue is at its bound; the client should retry after ``retry_after_s``."""

    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(
            f"the batch queue is full ({depth} images waiting); retry later",
            retry_after_s=retry_after_s,
        )


class RequestTimeoutError(DeadlineExceeded):
    """The result did not come within the per-request timeout."""


class InvalidInputError(InvalidInput):
    """The item does not have the model's input shape or dtype (refused before it can poison a
    batch shared with other requests)."""


class BatchFailedError(InferenceFailed):
    """The model run for the batch holding this request failed (a server fault)."""


#: (input, the caller's future, monotonic arrival time, the request's context or None)
_Item = tuple[np.ndarray, asyncio.Future, float, RequestContext | None]


class Batcher:
    """``await submit(x)`` with ``x`` float32 (C, H, W) returns that image's logits."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        max_queue_size: int = 512,
        timeout_s: float = 10.0,
        item_shape: tuple[int, ...] | None = None,
        normalize: Callable[[np.ndarray], np.ndarray] | None = None,
        lanes: int | Lanes = 1,
        inline_max_s: float = 0.0,
        inference_nice: int = 0,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        if (
            max_batch_size < 1
            or max_queue_size < 1
            or max_wait_s < 0
            or timeout_s <= 0
            or (isinstance(lanes, int) and lanes < 1)
        ):
            raise ValueError("batcher limits must be positive")
        self.run_batch = run_batch
        self.observer = observer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self.item_shape = tuple(item_shape) if item_shape is not None else None
        #: uint8 pixels (H, W, C, or N, H, W, C) -> float32 (C, H, W, or N, C, H, W). Given it,
        #: the batcher also takes an image as its uint8 pixels and normalises it on the
        #: inference thread when its batch runs: a queued image holds a quarter of the memory,
        #: and the event loop does less per request.
        self.normalize = normalize
        self._pixel_shape = (
            (item_shape[1], item_shape[2], item_shape[0])
            if normalize is not None and item_shape is not None
            else None
        )
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue_size)
        # ``lanes`` batches may run at once, each in its own thread (an ORT session may be run
        # from several threads). One lane with multi-threaded ORT gives the lowest latency for
        # a lone request; several single-threaded lanes waste no time in ORT's intra-op
        # barriers, which a busy event loop on the same cores makes expensive. Given a shared
        # :class:`Lanes`, the batchers of every loaded model take turns on the same lanes.
        self._owns_pool = not isinstance(lanes, Lanes)
        self.pool = Lanes(lanes, inference_nice=inference_nice) if self._owns_pool else lanes
        self._in_flight: set[asyncio.Task] = set()
        self._worker: asyncio.Task | None = None
        self._running = 0  # images in batches that are running now
        self._held = 0  # the image taken off the queue, waiting for a free lane
        #: Recent seconds of model time per image in one lane (an EWMA over batches); None until
        #: measured or seeded from the warm-up.
        self.image_seconds: float | None = None
        #: A lone image on an idle batcher runs on the event loop when the model takes at most
        #: ``inline_max_s`` for it (``single_image_s``, measured at start-up): for a model that
        #: answers in 0.1 ms, the hop to the inference thread and back costs more than the run.
        self.inline_max_s = inline_max_s
        self.single_image_s: float | None = None
        #: The first measurement (the start-up batch, on idle cores): a rate that does not
        #: sag when the cores get busy, for what must not follow load (refusal pacing).
        self.nominal_image_seconds: float | None = None
        self._batch_ids = itertools.count(1)  # names batches in traces

    @property
    def lanes(self) -> int:
        return self.pool.count

    # --- lifecycle
    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name="sepconv-batcher"
            )

    async def stop(self) -> None:
        """Stop the worker; queued requests fail instead of hanging (a shared pool of lanes
        stays open for the other models)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        while not self._queue.empty():
            _, fut, _, _ = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(BatchFailedError("the server is shutting down"))
        self.observer.queue_depth(0)
        if self._owns_pool:
            # A batch still in ORT finishes first, and the loop keeps serving meanwhile.
            await self.pool.close()

    @property
    def depth(self) -> int:
        """Images waiting: queued, or taken to wait for a free lane."""
        return self._queue.qsize() + self._held

    @property
    def backlog(self) -> int:
        """Images queued or running: the work ahead of a new arrival."""
        return self.depth + self._running

    def record_batch(self, size: int, seconds: float) -> None:
        """Fold one batch's model time into the per-image estimate (also used to seed it)."""
        per_image = seconds / size
        if self.image_seconds is None:
            self.image_seconds = per_image
            self.nominal_image_seconds = per_image
        else:
            # A short memory: the drain rate must follow load changes within a few batches.
            self.image_seconds += EWMA_WEIGHT * (per_image - self.image_seconds)

    def queued_seconds(self, extra: int = 0) -> float:
        """Model seconds of the ``backlog + extra`` images (one lane's time)."""
        if self.image_seconds is None:
            return 0.0
        return (self.backlog + extra) * self.image_seconds

    def seconds_to_drain(self, extra: int = 0) -> float:
        """Predicted seconds until ``backlog + extra`` images are through this model alone."""
        return self.queued_seconds(extra) / self.lanes

    def retry_after(self, extra: int = 0) -> int:
        """Whole seconds until the backlog has likely drained (:func:`retry_after`)."""
        return retry_after(self.seconds_to_drain(extra))

    # --- caller side
    async def submit(
        self, x: np.ndarray, ctx: RequestContext | None = None, *, alone: bool = False
    ) -> np.ndarray:
        """Queue one image and await its logits (:meth:`enqueue`, then wait)."""
        return await self.enqueue(x, ctx, alone=alone)

    def enqueue(
        self, x: np.ndarray, ctx: RequestContext | None = None, *, alone: bool = False
    ) -> asyncio.Future:
        """Queue one image now (no await: the caller knows it is queued when this returns) and
        give the future of its logits.

        The answer is given up (504) at the request timeout or at ``ctx.deadline``, whichever
        comes first; an item whose caller has given up, or cancelled the future, is never run.
        ``alone``: the caller knows no other request is in progress, so a cheap model may run
        this image at once on the event loop (see ``inline_max_s``).
        """
        if self._worker is None or self._worker.done():
            raise BatchFailedError("the batch worker is not running")
        if x.dtype == np.uint8 and self.normalize is not None:
            if self._pixel_shape is not None and x.shape != self._pixel_shape:
                raise InvalidInputError(
                    f"pixels must be uint8 {self._pixel_shape}, got {tuple(x.shape)}"
                )
        elif x.dtype != np.float32 or (self.item_shape is not None and x.shape != self.item_shape):
            raise InvalidInputError(
                f"input must be float32 {self.item_shape}, got {x.dtype} {tuple(x.shape)}"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        wait_s = self.timeout_s
        if ctx is not None and ctx.deadline is not None:
            wait_s = min(wait_s, ctx.deadline - now)
            if wait_s <= 0:
                self.observer.rejected("deadline")
                raise RequestTimeoutError("the request's deadline passed before it was queued")
        fut: asyncio.Future = loop.create_future()
        if alone and self.runs_inline():
            self._run_inline(x, fut, ctx)
            return fut
        try:
            self._queue.put_nowait((x, fut, now, ctx))
        except asyncio.QueueFull:
            self.observer.rejected("queue_full")
            raise QueueFullError(self.max_queue_size, self.retry_after()) from None
        self.observer.queue_depth(self.depth)
        # A timer that fails the future is cheaper than asyncio.wait_for (no extra task); a done
        # future is skipped by the worker, and so is one cancelled by a client disconnect.
        timer = loop.call_later(wait_s, self._expire, fut, wait_s)
        fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def runs_inline(self) -> bool:
        """Whether a lone image enqueued now would run on the event loop (a cheap model, and
        nothing queued or running on any lane)."""
        return (
            self.single_image_s is not None
            and self.single_image_s <= self.inline_max_s
            and self.pool.running == 0
            and self.backlog == 0
        )

    def _run_inline(self, x: np.ndarray, fut: asyncio.Future, ctx: RequestContext | None) -> None:
        """Run one image now, on the calling (event loop) thread; nothing else is running."""
        self.observer.batch_started(1, (0.0,), (ctx,))
        started = time.monotonic()
        item = (x, fut, started, ctx)
        try:
            out, seconds = self._timed_run([x])
            if len(out) != 1:
                raise BatchFailedError(f"the model returned {len(out)} results for 1 image")
        except Exception as exc:
            log.exception("inline inference failed")
            err = (
                exc
                if isinstance(exc, BatchFailedError)
                else BatchFailedError(f"inference failed: {type(exc).__name__}: {exc}")
            )
            fut.set_exception(err)
            self._finished(next(self._batch_ids), [item], started, str(err))
            return
        self._finished(next(self._batch_ids), [item], started, None)
        self.record_batch(1, seconds)
        self.observer.classified(1)
        fut.set_result(out[0])

    def _expire(self, fut: asyncio.Future, wait_s: float) -> None:
        if not fut.done():
            self.observer.rejected("timeout")
            fut.set_exception(
                RequestTimeoutError(f"no result within {wait_s:g} s; the server is overloaded")
            )

    # --- worker side
    async def _collect(self, first: _Item) -> list[_Item]:
        queue = self._queue
        batch = [first]
        while len(batch) < self.max_batch_size and not queue.empty():
            batch.append(queue.get_nowait())
        if len(batch) > 1 and len(batch) < self.max_batch_size and self.max_wait_s > 0:
            # Others are arriving: give stragglers until the first arrival's deadline.
            deadline = batch[0][2] + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
                while len(batch) < self.max_batch_size and not queue.empty():
                    batch.append(queue.get_nowait())
        self.observer.queue_depth(queue.qsize())
        return batch

    async def _work(self) -> None:
        while True:
            first = await self._queue.get()
            # The first image waits for a free lane (other models may hold them all) while the
            # queue behind it keeps filling, so the batch leaves as full as the wait allowed.
            self._held = 1
            try:
                await self.pool.acquire()
            except BaseException:
                self._held = 0
                if not first[1].done():
                    first[1].set_exception(BatchFailedError("the server is shutting down"))
                raise
            try:
                collected = await self._collect(first)
            except BaseException:
                self.pool.release()
                raise
            finally:
                self._held = 0
            now = time.monotonic()
            live = [item for item in collected if not item[1].done()]
            if not live:
                self.pool.release()
                continue
            self.observer.batch_started(
                len(live), [now - item[2] for item in live], [item[3] for item in live]
            )
            for _, _, enqueued, ctx in live:
                if ctx is not None and now - enqueued > ctx.queue_s:
                    ctx.queue_s = now - enqueued
            task = asyncio.get_running_loop().create_task(self._run(live, now))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _stack(self, rows: list[np.ndarray]) -> np.ndarray:
        """The rows as one float32 batch, pixels normalised (on the thread that runs it)."""
        normalize = self.normalize
        if normalize is None:
            return np.stack(rows) if len(rows) > 1 else rows[0][None]
        if all(row.dtype == np.uint8 for row in rows):
            return normalize(np.stack(rows) if len(rows) > 1 else rows[0][None])
        return np.stack([normalize(r) if r.dtype == np.uint8 else r for r in rows])

    def _timed_run(self, rows: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Stack, normalise and run ``rows``: the model time includes the normalisation."""
        start = time.perf_counter()
        out = self.run_batch(self._stack(rows))
        return out, time.perf_counter() - start

    async def _run(self, live: list[_Item], started: float) -> None:
        loop = asyncio.get_running_loop()
        batch_id = next(self._batch_ids)
        self._running += len(live)
        self.pool.running += len(live)
        try:
            rows = [item[0] for item in live]
            out, seconds = await loop.run_in_executor(self.pool.executor, self._timed_run, rows)
            if len(out) != len(live):
                raise BatchFailedError(
                    f"the model returned {len(out)} results for a batch of {len(live)}"
                )
        except asyncio.CancelledError:
            for _, fut, _, _ in live:
                if not fut.done():
                    fut.set_exception(BatchFailedError("the server is shutting down"))
            raise
        except Exception as exc:
            log.exception("batch of %d failed", len(live))
            err = (
                exc
                if isinstance(exc, BatchFailedError)
                else BatchFailedError(
                    f"inference failed for a batch of {len(live)}: {type(exc).__name__}: {exc}"
                )
            )
            for _, fut, _, _ in live:
                if not fut.done():
                    fut.set_exception(err)
            self._finished(batch_id, live, started, str(err))
            return
        finally:
            self._running -= len(live)
            self.pool.running -= len(live)
            self.pool.release()
        self._finished(batch_id, live, started, None)
        self.record_batch(len(live), seconds)
        self.observer.classified(len(live))
        for i, (_, fut, _, _) in enumerate(live):
            if not fut.done():  # cancelled while the batch ran
                fut.set_result(out[i])

    def _finished(
        self, batch_id: int, live: list[_Item], started: float, error: str | None
    ) -> None:
        """Each request's run time, and the batch hook (traces link the requests that shared
        the batch)."""
        ended = time.monotonic()
        if error is None:
            for _, _, _, ctx in live:
                if ctx is not None and ended - started > ctx.infer_s:
                    ctx.infer_s = ended - started
        rows = [(item[3], item[2]) for item in live]
        self.observer.batch_finished(batch_id, started, ended, rows, error)
