"""The dynamic batcher on its own, with fake models whose behaviour the tests control."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.engine.batcher import (
    Batcher,
    BatchFailedError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
)
from service.metrics import PrometheusObserver

from .waiting import wait_event, wait_until_async

#: The labels of the observer these batchers report to.
MODEL = {"model": "batcher-test", "version": "1"}


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {**MODEL, **labels}) or 0.0


class FakeModel:
    """Logits = per-image pixel sums, so every answer identifies its own input.

    ``gate`` (open unless a test clears it) holds each batch inside the model; ``entered`` is set
    once a batch has reached the model, so a test knows the worker is busy with it.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[np.ndarray] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(30)
        self.threads.add(threading.current_thread().name)
        self.batches.append(x.copy())
        if self.delay_s:
            time.sleep(self.delay_s)  # a model that takes time: batches overlap with arrivals
        s = x.reshape(len(x), -1).sum(axis=1)
        return np.stack([s, -s], axis=1)


def _image(value: float) -> np.ndarray:
    return np.full((1, 4, 4), value, dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


async def in_the_model(model: FakeModel) -> None:
    await wait_event(model.entered, "no batch reached the model")


async def queued(b: Batcher, n: int) -> None:
    """``n`` images wait: in the queue, or taken by the worker to wait for a lane."""
    await wait_until_async(lambda: b.depth >= n, lambda: f"only {b.depth} of {n} images queued")


async def _with_batcher(model, body, **kw):
    # The metrics these tests read are the Prometheus observer's, as in the app.
    batcher = Batcher(model, observer=PrometheusObserver(**MODEL), **kw)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def test_concurrent_requests_get_their_own_results_in_batches():
    model = FakeModel(delay_s=0.002)

    async def body(b: Batcher):
        async def one(i: int):
            await asyncio.sleep((i % 7) * 0.0005)  # staggered arrivals, varied batch make-up
            return i, await b.submit(_image(i))

        return await asyncio.gather(*(one(i) for i in range(100)))

    results = run(_with_batcher(model, body, max_batch_size=8, max_wait_s=0.001))
    for i, logits in results:
        assert logits.shape == (2,)
        assert logits[0] == pytest.approx(16 * i)  # 4x4 pixels of value i
    sizes = [len(x) for x in model.batches]
    assert sum(sizes) == 100
    assert max(sizes) > 1 and max(sizes) <= 8
    # ORT must never run on the event loop thread.
    assert model.threads and all(t.startswith("sepconv-infer") for t in model.threads)


def test_idle_queue_does_not_wait_for_max_wait():
    model = FakeModel()

    async def body(b: Batcher):
        start = time.perf_counter()
        out = await b.submit(_image(1))
        return out, time.perf_counter() - start

    out, elapsed = run(_with_batcher(model, body, max_wait_s=1.0))
    assert out[0] == 16
    assert elapsed < 0.5  # a lone request would otherwise sit out the full second


def test_stragglers_join_a_forming_batch_until_the_deadline():
    model = FakeModel()

    async def body(b: Batcher):
        model.gate.clear()  # hold the first batch so two requests queue up behind it
        first = asyncio.create_task(b.submit(_image(0)))
        await in_the_model(model)
        pair = [asyncio.create_task(b.submit(_image(v))) for v in (1, 2)]
        await queued(b, 2)
        model.gate.set()
        await first
        # The worker has taken the pair off the queue and waits for stragglers (nothing awaits
        # between taking the pair and that wait): well inside the 0.5 s window of the pair's
        # first arrival, the late one arrives as a straggler, not as part of the queue.
        await wait_until_async(lambda: b._queue.empty(), "the worker never took the pair")
        late = asyncio.create_task(b.submit(_image(3)))
        return await asyncio.gather(*pair, late)

    results = run(_with_batcher(model, body, max_batch_size=8, max_wait_s=0.5))
    assert [r[0] for r in results] == [16, 32, 48]
    assert [len(x) for x in model.batches] == [1, 3]


def test_full_queue_rejects_at_once():
    model = FakeModel()
    before = _sample("sepconv_batch_rejected_total", reason="queue_full")

    async def body(b: Batcher):
        model.gate.clear()
        running = asyncio.create_task(b.submit(_image(0)))
        await in_the_model(model)  # the worker has taken it and is blocked in the model
        # Enqueued without an await in between: the worker cannot take one of them off the
        # queue before the next arrives, so the queue holds exactly its bound.
        waiting = [b.enqueue(_image(v)) for v in (1, 2)]
        start = time.perf_counter()
        with pytest.raises(QueueFullError) as info:
            await b.submit(_image(9))
        elapsed = time.perf_counter() - start
        model.gate.set()
        done = await asyncio.gather(running, *waiting)
        return info.value, elapsed, done

    err, elapsed, done = run(_with_batcher(model, body, max_batch_size=1, max_queue_size=2))
    assert elapsed < 1.0 and err.retry_after_s >= 1  # at once, not after the 10 s timeout
    assert [d[0] for d in done] == [0, 16, 32]
    assert _sample("sepconv_batch_rejected_total", reason="queue_full") == before + 1


def test_timed_out_request_fails_and_is_dropped_from_the_batch():
    model = FakeModel()
    before = _sample("sepconv_batch_rejected_total", reason="timeout")

    async def body(b: Batcher):
        model.gate.clear()
        blocker = asyncio.create_task(b.submit(_image(0)))
        await in_the_model(model)  # so 7 cannot share the blocker's batch
        with pytest.raises(RequestTimeoutError, match="no result within"):
            await b.submit(_image(7))
        model.gate.set()
        with pytest.raises(RequestTimeoutError):
            await blocker  # it also waited past the timeout inside the model
        return await b.submit(_image(2))  # the worker carries on

    out = run(_with_batcher(model, body, max_batch_size=4, timeout_s=0.1))
    assert out[0] == 32
    seen = np.concatenate(model.batches)[:, 0, 0, 0].tolist()
    assert 7.0 not in seen  # the expired request never reached the model
    assert _sample("sepconv_batch_rejected_total", reason="timeout") == before + 2


def test_cancelled_request_is_skipped():
    model = FakeModel()

    async def body(b: Batcher):
        model.gate.clear()
        blocker = asyncio.create_task(b.submit(_image(0)))
        await in_the_model(model)
        doomed = asyncio.create_task(b.submit(_image(5)))
        kept = asyncio.create_task(b.submit(_image(6)))
        await queued(b, 2)  # both are in the batcher before one is given up
        doomed.cancel()  # a client that disconnected
        model.gate.set()
        return await asyncio.gather(blocker, kept)

    results = run(_with_batcher(model, body, max_batch_size=4))
    assert [r[0] for r in results] == [0, 96]
    seen = np.concatenate(model.batches)[:, 0, 0, 0].tolist()
    assert seen == [0.0, 6.0]


def test_failed_batch_fails_every_request_in_it_and_the_worker_survives():
    calls = []
    entered, gate = threading.Event(), threading.Event()

    def flaky(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            entered.set()
            gate.wait(30)  # held while the next requests queue up into one batch
            return np.zeros((len(x), 2), np.float32)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return np.ones((len(x), 2), np.float32)

    async def body(b: Batcher):
        first = asyncio.create_task(b.submit(_image(0)))
        await wait_event(entered, "the first batch never reached the model")
        batch = [asyncio.create_task(b.submit(_image(v))) for v in range(3)]
        await queued(b, 3)
        gate.set()
        await first
        outcomes = await asyncio.gather(*batch, return_exceptions=True)
        after = await b.submit(_image(1))
        return outcomes, after

    outcomes, after = run(_with_batcher(flaky, body, max_batch_size=8))
    assert calls[1] == 3
    assert all(isinstance(o, BatchFailedError) for o in outcomes)
    assert "CUDA out of memory" in str(outcomes[0])
    assert after.tolist() == [1.0, 1.0]


def test_wrong_result_count_is_a_batch_failure():
    def short(x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x) + 1, 2), np.float32)

    async def body(b: Batcher):
        with pytest.raises(BatchFailedError, match="returned 2 results for a batch of 1"):
            await b.submit(_image(0))

    run(_with_batcher(short, body))


def test_metrics_record_batch_size_and_queue_wait():
    model = FakeModel(delay_s=0.005)
    size_count = _sample("sepconv_batch_size_count")
    size_sum = _sample("sepconv_batch_size_sum")
    wait_count = _sample("sepconv_batch_queue_wait_seconds_count")

    async def body(b: Batcher):
        await asyncio.gather(*(b.submit(_image(i)) for i in range(10)))

    run(_with_batcher(model, body, max_batch_size=4))
    assert _sample("sepconv_batch_size_sum") == size_sum + 10
    assert _sample("sepconv_batch_size_count") == size_count + len(model.batches)
    assert _sample("sepconv_batch_queue_wait_seconds_count") == wait_count + 10
    assert _sample("sepconv_batch_queue_depth") == 0


def test_stop_fails_queued_requests_instead_of_hanging():
    model = FakeModel()

    async def body():
        b = Batcher(model, max_batch_size=1)
        b.start()
        model.gate.clear()
        running = asyncio.create_task(b.submit(_image(0)))
        await in_the_model(model)
        waiting = asyncio.create_task(b.submit(_image(1)))
        await queued(b, 1)
        stopper = asyncio.create_task(b.stop())
        # The model is let go only once stop has failed the request it holds (stop then waits
        # for the lane to finish, and must not hang on it).
        await wait_until_async(running.done, "stop did not fail the running request")
        model.gate.set()
        await stopper
        results = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(BatchFailedError, match="not running"):
            await b.submit(_image(2))
        return results

    results = run(body())
    assert all(isinstance(r, BatchFailedError) for r in results)


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        Batcher(FakeModel(), max_batch_size=0)


def test_malformed_item_is_refused_without_touching_the_batch():
    model = FakeModel()

    async def body(b: Batcher):
        with pytest.raises(InvalidInputError, match="float32"):
            await b.submit(np.zeros((1, 4, 4), np.float64))
        with pytest.raises(InvalidInputError, match=r"\(1, 4, 4\)"):
            await b.submit(np.zeros((1, 5, 4), np.float32))
        return await b.submit(_image(1))

    out = run(_with_batcher(model, body, item_shape=(1, 4, 4)))
    assert out[0] == 16 and len(model.batches) == 1


def test_lanes_run_batches_concurrently_without_mixing_results():
    model = FakeModel(delay_s=0.02)
    active = {"now": 0, "max": 0}
    lock = threading.Lock()

    def counting(x: np.ndarray) -> np.ndarray:
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        try:
            return model(x)
        finally:
            with lock:
                active["now"] -= 1

    async def body(b: Batcher):
        async def one(i: int):
            return i, await b.submit(_image(i))

        return await asyncio.gather(*(one(i) for i in range(40)))

    results = run(_with_batcher(counting, body, max_batch_size=4, max_wait_s=0.0, lanes=2))
    for i, logits in results:
        assert logits[0] == pytest.approx(16 * i)
    assert active["max"] == 2  # two batches overlapped, never more than the lanes
    assert len(model.threads) == 2
    assert sum(len(x) for x in model.batches) == 40


def test_stop_fails_requests_of_batches_still_running():
    model = FakeModel()
    model.gate.clear()  # the model blocks until released

    async def body():
        b = Batcher(model, max_batch_size=2, lanes=2)
        b.start()
        pending = asyncio.ensure_future(b.submit(_image(1)))
        await in_the_model(model)
        stopper = asyncio.ensure_future(b.stop())
        await wait_until_async(pending.done, "stop did not fail the running request")
        model.gate.set()
        await stopper
        with pytest.raises(BatchFailedError, match="shutting down"):
            await pending

    run(body())


def test_inference_threads_can_yield_to_the_event_loop():
    import os
    import threading

    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = []

    def model(x):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return x.reshape(len(x), -1)

    async def body():
        b = Batcher(model, inference_nice=5)
        b.start()
        try:
            await b.submit(_image(1))
        finally:
            await b.stop()

    run(body())
    assert seen == [min(base + 5, 19)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the loop's thread is untouched


def test_pixels_are_normalised_on_the_inference_thread_as_in_training():
    """Images may wait as uint8 pixels (a quarter of the memory): the batch normalises them
    with the one preprocessing function, so the model sees the tensors training gave it."""
    import functools

    from sepconv.preprocess import Preprocessing, normalize

    spec = Preprocessing(input_size=4, color_mode="RGB", mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    seen: list[np.ndarray] = []

    def model(x):
        seen.append(x)
        return x.reshape(len(x), -1)[:, :2]

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(3)]
    tensor = normalize(pixels[0], spec)

    async def scenario():
        batcher = Batcher(
            model,
            item_shape=(3, 4, 4),
            normalize=functools.partial(normalize, spec=spec),
            max_wait_s=0.05,
        )
        batcher.start()
        try:
            with pytest.raises(InvalidInputError, match="uint8"):
                batcher.enqueue(np.zeros((3, 4, 4), np.uint8))  # channels first: not pixels
            futures = [batcher.enqueue(p) for p in pixels] + [batcher.enqueue(tensor)]
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    expected = [normalize(p, spec) for p in pixels] + [tensor]
    assert all(x.dtype == np.float32 for x in seen)
    ran = np.concatenate(seen)
    np.testing.assert_array_equal(ran, np.stack(expected)[: len(ran)])
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_array_equal(answer, want.reshape(-1)[:2])
