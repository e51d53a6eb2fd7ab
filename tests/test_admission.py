"""Admission control: refusals come before any decoding, expired work never reaches the model,
and Retry-After follows the measured drain rate."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.engine import decode
from service.engine.admission import MAX_REFUSAL_HOLD_S, REFUSAL_BURST_S, Admission
from service.engine.batcher import Batcher, RequestTimeoutError
from service.engine.context import RequestContext
from service.engine.observer import EngineObserver, FanOut
from service.errors import Overloaded
from service.metrics import REFUSAL_HOLD
from service.settings import Settings

from .conftest import png_bytes
from .waiting import wait_event

PNG = {"content-type": "image/png"}


class GatedModel:
    """Blocks in the model until released (``entered`` says a batch is there); records every
    row it was given."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.seen: list[float] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(30)
        self.seen.extend(float(v) for v in x[:, 0, 0, 0])
        return x.reshape(len(x), -1)[:, :2]


def _row(value: float) -> np.ndarray:
    return np.full((1, 2, 2), value, np.float32)


def test_predicted_wait_and_retry_after_follow_the_drain_rate():
    batcher = Batcher(lambda x: x, max_queue_size=64, lanes=2)
    admission = Admission(batcher, max_delay_s=0.05)
    assert admission.predicted_wait() == 0.0  # nothing measured: never refuse blind
    batcher.record_batch(10, 0.1)  # 10 ms per image in one lane
    admission.reserved = 30  # 30 images being decoded
    # 30 images ahead x 10 ms / 2 lanes = 150 ms > the 50 ms budget
    assert admission.predicted_wait() == pytest.approx(0.15)
    with pytest.raises(Overloaded, match="150 ms of work") as info:
        admission.check()
    assert info.value.status_code == 429 and info.value.retry_after_s == 1
    admission.reserved = 500
    with pytest.raises(Overloaded) as info:
        admission.check()
    assert info.value.code == "overloaded"
    # The queue bound comes first: 500 + 1 > 64.
    assert "queue is full" in info.value.detail
    batcher.max_queue_size = 10_000
    with pytest.raises(Overloaded) as info:
        admission.check()
    # 500 x 10 ms / 2 lanes = 2.5 s -> 3 s
    assert info.value.retry_after_s == 3
    admission.reserved = 4  # 20 ms ahead: admitted
    admission.check()


def test_the_estimate_follows_recent_batches():
    batcher = Batcher(lambda x: x)
    batcher.record_batch(32, 0.32)
    assert batcher.image_seconds == pytest.approx(0.01)
    for _ in range(30):
        batcher.record_batch(8, 0.16)  # the model got slower: 20 ms per image
    assert batcher.image_seconds == pytest.approx(0.02, rel=0.01)


def test_refusals_past_the_paced_rate_are_held_until_their_retry_after():
    batcher = Batcher(lambda x: x)
    admission = Admission(batcher, max_delay_s=1.0, refusal_rate_factor=4)
    assert admission.refusal_delay(0.0) == 0.0  # nothing measured yet: never held
    batcher.record_batch(10, 0.1)  # 10 ms per image: 100 images/s, so 400 refusals/s
    assert admission.refusal_rate() == pytest.approx(400.0)
    now = 50.0
    delays = [admission.refusal_delay(now, retry_after_s=2) for _ in range(600)]  # a storm
    free = int(REFUSAL_BURST_S * 400) + 1  # the burst allowance goes out at once
    assert delays[:free] == [0.0] * free
    # Past it, each refusal is held for the Retry-After it carries: a client that retries at
    # once retries at the pace it was told.
    assert delays[free:] == [2.0] * (600 - free)
    # However long the storm, the schedule never runs more than MAX_REFUSAL_HOLD_S ahead: a
    # second after it stops, refusals are answered at once again.
    for _ in range(10_000):
        admission.refusal_delay(now)
    later = now + MAX_REFUSAL_HOLD_S + REFUSAL_BURST_S + 0.01
    assert admission.refusal_delay(later, retry_after_s=3) == 0.0


def test_refusals_at_the_paced_rate_are_never_held():
    """Open-loop overload refused below the paced rate (8x overload: refusals at 7x the model's
    rate, under 8x) gets every answer at once."""
    batcher = Batcher(lambda x: x)
    admission = Admission(batcher, max_delay_s=1.0, refusal_rate_factor=8)
    batcher.record_batch(10, 0.1)  # 100 images/s: refusals paced past 800/s
    gap = 1 / 700  # refusals at 7x the model's rate, evenly spread, for 10 s
    assert all(admission.refusal_delay(100.0 + i * gap) == 0.0 for i in range(7000))


def test_pacing_follows_the_nominal_rate_not_the_sagging_estimate():
    batcher = Batcher(lambda x: x)
    admission = Admission(batcher, max_delay_s=1.0, refusal_rate_factor=8)
    batcher.record_batch(32, 0.32)  # start-up: 10 ms per image
    for _ in range(30):
        batcher.record_batch(32, 0.96)  # busy cores: 30 ms per image
    assert batcher.image_seconds == pytest.approx(0.03, rel=0.01)
    assert admission.refusal_rate() == pytest.approx(800.0)  # 8 x 100/s, as at start-up
    assert Admission(batcher, max_delay_s=1.0).refusal_rate() == 0.0  # factor 0: off
    with pytest.raises(ValueError):
        Admission(batcher, max_delay_s=1.0, refusal_rate_factor=-1)


def test_reservations_count_until_released():
    batcher = Batcher(lambda x: x)
    admission = Admission(batcher, max_delay_s=1.0)
    with admission.reserve(3):
        assert admission.reserved == 3
        with pytest.raises(RuntimeError), admission.reserve(2):
            assert admission.reserved == 5
            raise RuntimeError("decode failed")
        assert admission.reserved == 3
    assert admission.reserved == 0


def test_expired_requests_never_reach_the_model():
    model = GatedModel()

    async def body():
        batcher = Batcher(model, max_batch_size=4, max_queue_size=16)
        batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit(_row(1)))
            # The worker holds row 1 inside the gated model.
            await wait_event(model.entered, "row 1 never reached the model")
            loop_now = asyncio.get_running_loop().time()
            short = RequestContext(deadline=loop_now + 0.05)
            expiring = [asyncio.ensure_future(batcher.submit(_row(v), short)) for v in (2, 3)]
            patient = asyncio.ensure_future(batcher.submit(_row(4)))
            results = await asyncio.gather(*expiring, return_exceptions=True)
            model.gate.set()
            return results, await running, await patient
        finally:
            await batcher.stop()

    expired, first, last = asyncio.run(body())
    assert all(isinstance(r, RequestTimeoutError) for r in expired)
    assert first[0] == 1 and last[0] == 4
    assert model.seen == [1.0, 4.0], "expired rows 2 and 3 must never be run"


@pytest.fixture
def client(tiny_model_path):
    settings = Settings(model_path=tiny_model_path, warmup_runs=0, max_queue_delay_ms=50)
    with TestClient(create_app(settings)) as c:
        yield c


def _overload(client, images_being_decoded: int) -> None:
    classifier = client.app.state.repository.lookup().classifier
    classifier.batcher.image_seconds = 0.01
    classifier.admission.reserved = images_being_decoded


def test_refused_before_any_decoding(client, monkeypatch, make_png):
    calls = []
    real = decode.preprocess_images_async

    async def spy(*args, **kwargs):
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(decode, "preprocess_images_async", spy)
    assert client.post("/v1/classify", content=make_png(1), headers=PNG).status_code == 200
    assert calls == [1]
    _overload(client, images_being_decoded=20)  # 20 x 10 ms = 200 ms > 50 ms
    try:
        r = client.post("/v1/classify", content=make_png(2), headers=PNG)
        oip = client.post(
            "/v2/models/tiny-l/infer",
            json={
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]
            },
        )
    finally:
        client.app.state.repository.lookup().classifier.admission.reserved = 0
    assert r.status_code == 429 and r.json()["error"] == "overloaded"
    assert "budget" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"
    assert oip.status_code == 429 and "budget" in oip.json()["error"]
    assert calls == [1], "a refused request must not be decoded"


def test_images_being_decoded_count_as_queued_work(client, monkeypatch):
    admission = client.app.state.repository.lookup().classifier.admission
    during = []
    real = decode.preprocess_images_async

    async def spy(*args, **kwargs):
        during.append(admission.reserved)
        return await real(*args, **kwargs)

    monkeypatch.setattr(decode, "preprocess_images_async", spy)
    blob = png_bytes(np.zeros((28, 28), np.uint8))
    files = [("file", (f"{i}.png", blob, "image/png")) for i in range(4)]
    r = client.post("/v1/classify", files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    assert during == [4] and admission.reserved == 0


def test_retry_after_header_comes_from_the_drain_rate(client, make_png):
    _overload(client, images_being_decoded=350)  # 350 x 10 ms = 3.5 s -> 4
    try:
        r = client.post("/v1/classify", content=make_png(3), headers=PNG)
    finally:
        client.app.state.repository.lookup().classifier.admission.reserved = 0
    assert r.status_code == 429 and r.headers["retry-after"] == "4"


def test_a_refusal_storm_is_held_back_then_refused(client, make_png):
    """Past the paced rate a refusal is held until its Retry-After, then gets the same 429;
    admitted work is unaffected."""
    classifier = client.app.state.repository.lookup().classifier
    admission = classifier.admission
    admission.refusal_rate_factor = 1
    classifier.batcher.nominal_image_seconds = 0.1  # 10 refusals/s
    hold = REFUSAL_HOLD.labels(classifier.spec.name, classifier.spec.version)
    held_before = hold._sum.get()
    _overload(client, images_being_decoded=20)
    try:
        answers = [client.post("/v1/classify", content=make_png(i), headers=PNG) for i in (4, 5)]
    finally:
        admission.reserved = 0
    assert [r.status_code for r in answers] == [429, 429]
    assert all(r.json()["error"] == "overloaded" for r in answers)
    # The first went out at once (the burst); the second came faster than 10 refusals/s and
    # was held until its Retry-After (1 s) before the same 429.
    assert hold._sum.get() - held_before == pytest.approx(1.0)
    assert answers[1].headers["retry-after"] == "1"
    assert client.post("/v1/classify", content=make_png(6), headers=PNG).status_code == 200


class HoldRecorder(EngineObserver):
    """Says when a refusal starts waiting its turn."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()

    def refusal_held(self, seconds: float) -> None:
        self.holding.set()


def test_a_held_refusal_is_not_counted_in_progress(client, monkeypatch):
    classifier = client.app.state.repository.lookup().classifier
    classifier.admission.refusal_rate_factor = 1
    classifier.batcher.nominal_image_seconds = 0.1  # 10 refusals/s: the second one is held

    async def refused():
        with pytest.raises(Overloaded):
            async with classifier._request(None):
                raise Overloaded("busy", retry_after_s=1)

    async def scenario():
        recorder = HoldRecorder()  # made on the loop: its event belongs to it
        admission = classifier.admission
        monkeypatch.setattr(admission, "observer", FanOut(admission.observer, recorder))
        await refused()  # takes the burst allowance
        assert not recorder.holding.is_set()
        held = asyncio.ensure_future(refused())
        await asyncio.wait_for(recorder.holding.wait(), 30)  # the second refusal is held now
        during = classifier.active
        await held
        return during

    assert client.portal.call(scenario) == 0
    assert classifier.active == 0


def test_a_lone_request_on_a_cheap_model_runs_inline(tiny_model_path, make_png):
    """No thread hop for the 0.1 ms model when nothing else is in progress; the answers are the
    same as through the batcher's thread."""
    bodies = [make_png(i) for i in range(3)]
    answers = {}
    for inline_ms in (1000.0, 0.0):
        settings = Settings(
            model_path=tiny_model_path, warmup_runs=0, inline_inference_max_ms=inline_ms
        )
        with TestClient(create_app(settings)) as c:
            batcher = c.app.state.repository.lookup().classifier.batcher
            threads = []
            inner = batcher.run_batch

            def spy(x, inner=inner, threads=threads):
                threads.append(threading.current_thread().name)
                return inner(x)

            batcher.run_batch = spy
            answers[inline_ms] = [
                c.post("/v1/classify", content=b, headers=PNG).json()["results"] for b in bodies
            ]
        if inline_ms:
            assert not any(t.startswith("sepconv-infer") for t in threads)
        else:
            assert all(t.startswith("sepconv-infer") for t in threads)
        assert len(threads) == 3
    assert answers[1000.0] == answers[0.0]


@pytest.mark.slow
def test_a_retry_storm_retries_at_the_pace_of_retry_after(tiny_model_path, tmp_path):
    """End to end: 16 clients that resend the moment they are refused, against a server whose
    latency budget refuses nearly everything and whose paced rate is far above what 16 clients
    need. Held until their Retry-After, refusals come about once a second per client instead of
    as fast as the paced rate lets them."""
    from bench import loadgen
    from bench.server import ServerProcess

    from .conftest import png_bytes

    env = {
        "SEPCONV_WORKERS": "1",
        "SEPCONV_INLINE_INFERENCE_MAX_MS": "0",  # every image through the queue
        "SEPCONV_MAX_BATCH_SIZE": "1",
        "SEPCONV_MAX_QUEUE_DELAY_MS": "0.01",  # any queued image is over the budget
        # Refusals paced past 0.02 / (model seconds per image): hundreds per second here.
        "SEPCONV_REFUSAL_RATE_FACTOR": "0.02",
    }
    clients, seconds = 16, 3.0
    with ServerProcess(tiny_model_path, env, tmp_path / "server.log") as server:
        target = loadgen.Target(
            server.host, server.port, "/v1/classify", (png_bytes(np.zeros((28, 28), np.uint8)),)
        )
        result = loadgen.run(
            loadgen.closed_loop(target, concurrency=clients, duration_s=seconds, timeout_s=10)
        )
    refused = result.errors.get("http_429", 0)
    assert set(result.errors) <= {"http_429"}, result.errors
    assert result.ok > 0 and refused > 0
    # Each refusing client is answered about once per Retry-After (1 s), plus the burst
    # allowance answered at once each time the schedule has drained (about once a second):
    # under 2 x clients x (seconds + 1). Answering at the paced rate gave 310 here.
    assert refused <= 2 * clients * (seconds + 1), refused
    # Most were held (those answered at once are each second's burst allowance).
    held = [s for s in result.refused_latencies if s >= 0.9]
    assert len(held) >= refused / 2
