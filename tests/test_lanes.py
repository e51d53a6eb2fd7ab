"""The process's lanes: one pool for every model, and a lone request on every core (the busy
flags the workers share, the second session it runs on)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.engine.lanes import BusyBoard, Lanes
from service.engine.loader import open_runtime
from service.settings import Settings


def test_busy_board_flags_are_shared_between_workers(tmp_path):
    path = tmp_path / "busy"
    first, second = BusyBoard(path, 0, 2), BusyBoard(path, 1, 2)
    assert not first.others_busy() and not second.others_busy()
    second.set(True)
    assert first.others_busy() and not second.others_busy()  # a worker ignores its own flag
    second.close()  # a worker that stops is not busy any more
    assert not first.others_busy()
    with pytest.raises(ValueError, match="outside"):
        BusyBoard(path, 2, 2)


def test_lanes_say_alone_for_one_request_and_no_busy_peer(tmp_path):
    async def scenario():
        lanes = Lanes(1)
        lanes.board = BusyBoard(tmp_path / "busy", 0, 2)
        peer = BusyBoard(tmp_path / "busy", 1, 2)
        seen = [lanes.alone()]  # nothing in progress: not a lone request either
        lanes.enter()
        seen.append(lanes.alone())
        lanes.enter()
        seen.append(lanes.alone())  # two requests here
        lanes.leave()
        peer.set(True)
        seen.append(lanes.alone())  # one here, one in the other worker
        peer.set(False)
        seen.append(lanes.alone())
        lanes.leave()
        flag_after = peer.others_busy()  # this worker's flag, seen from the other one
        await lanes.close()
        return seen, flag_after

    seen, flag_after = asyncio.run(scenario())
    assert seen == [False, True, False, False, True]
    assert flag_after is False


class Spy:
    """Stands in for an ORT session: records that it ran."""

    def __init__(self, session) -> None:
        self.session = session
        self.runs = 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_a_lone_request_runs_on_the_session_with_every_thread(tiny_model_path):
    settings = Settings(model_path=tiny_model_path, intra_op_threads=1, lone_request_threads=2)
    assert settings.resolved_lone_request_threads == 2
    runtime = open_runtime(settings, tiny_model_path)
    assert runtime.lone_threads == 2 and runtime.lone_session is not None
    narrow, lone = Spy(runtime.session), Spy(runtime.lone_session)
    runtime.session, runtime.lone_session = narrow, lone
    x = np.zeros((1, *runtime.input_shape), np.float32)
    first = runtime.run(x)  # not alone (the default): the usual session
    runtime.alone = lambda: True
    second = runtime.run(x)
    assert (narrow.runs, lone.runs) == (1, 1)
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    runtime.close()
    assert runtime.session is None and runtime.lone_session is None


def test_no_lone_session_when_it_would_not_have_more_threads(tiny_model_path):
    assert Settings(intra_op_threads=2, lone_request_threads=2).resolved_lone_request_threads == 0
    settings = Settings(model_path=tiny_model_path, intra_op_threads=2, lone_request_threads=1)
    runtime = open_runtime(settings, tiny_model_path)
    assert runtime.lone_session is None and runtime.lone_threads == 0
    runtime.alone = lambda: True
    assert runtime.run(np.zeros((1, *runtime.input_shape), np.float32)).shape == (1, 3)


def test_a_batch_over_the_run_memory_budget_runs_in_pieces(tiny_model_path):
    runtime = open_runtime(Settings(model_path=tiny_model_path), tiny_model_path)
    per_image = runtime.cost_report().activation_bytes_per_image()
    assert per_image > 0
    x = np.random.default_rng(0).standard_normal((10, *runtime.input_shape)).astype(np.float32)
    whole = runtime.run(x)
    assert runtime.limit_run_memory(per_image * 3 + 1) == 3
    spy = runtime.session = Spy(runtime.session)
    pieces = runtime.run(x)
    assert spy.runs == 4  # 3 + 3 + 3 + 1 images
    np.testing.assert_allclose(whole, pieces, rtol=1e-5, atol=1e-6)
    assert runtime.time_batch(7, runs=1) > 0 and spy.runs == 7  # timed in pieces too
