"""Triton's extensions over HTTP with the real tritonclient.http (model configuration,
statistics, repository index), and the engine hooks the statistics are counted from."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from sepconv.spec import read_spec
from service.engine.batcher import Batcher, BatchFailedError
from service.engine.classifier import Classifier
from service.engine.context import RequestContext
from service.engine.observer import EngineObserver, FanOut
from service.protocols import triton

from .conftest import FailingBatcher
from .test_grpc import Served, _settings, swapped


@pytest.fixture(scope="module")
def served(tiny_model_path):
    from service.api.app import create_app

    server = Served(create_app(_settings(tiny_model_path, grpc_port=0, lanes=2)))
    yield server
    server.stop()


@pytest.fixture
def client(served):
    c = thttp.InferenceServerClient(served.http_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def spec(tiny_model_path):
    return read_spec(str(tiny_model_path))


def infer(client, spec, rows: int) -> None:
    inp = thttp.InferInput("input", [rows, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.zeros((rows, 1, 28, 28), np.float32))
    client.infer(spec.name, [inp])


def test_server_metadata_lists_the_extensions(client):
    extensions = set(client.get_server_metadata()["extensions"])
    assert {"model_configuration", "statistics", "binary_tensor_data", "classification"} <= (
        extensions
    )


def test_model_config(client, spec, served):
    config = client.get_model_config(spec.name)
    assert config == client.get_model_config(spec.name, spec.version)
    settings = served.state.settings
    assert config["name"] == spec.name and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == settings.max_batch_size
    tensor, image = config["input"]
    assert tensor == {
        "name": "input",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NCHW",
        "dims": [1, 28, 28],
        "optional": True,
    }
    assert image["name"] == "image" and image["data_type"] == "TYPE_STRING"
    assert config["output"] == [
        {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [spec.num_classes]}
    ]
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000)
    }
    assert config["instance_group"] == [{"name": spec.name, "kind": "KIND_CPU", "count": 2}]


def test_unknown_model_config_or_stats_is_404(client, spec):
    for call in (
        lambda: client.get_model_config("resnet50"),
        lambda: client.get_model_config(spec.name, "999"),
        lambda: client.get_inference_statistics("resnet50"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "404"


def _stat(doc: dict) -> dict:
    (model,) = doc["model_stats"]
    return model


def test_statistics_count_what_the_engine_did(client, spec):
    before = _stat(client.get_inference_statistics(spec.name))
    infer(client, spec, 3)
    infer(client, spec, 1)
    after = _stat(client.get_inference_statistics(spec.name, spec.version))
    assert after["name"] == spec.name and after["version"] == spec.version
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["execution_count"] - before["execution_count"] >= 2
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    stats, old = after["inference_stats"], before["inference_stats"]
    assert set(stats) == set(triton.INFERENCE_STATS)
    for name in triton.INFERENCE_STATS:
        assert isinstance(stats[name]["count"], int) and isinstance(stats[name]["ns"], int)
    assert stats["success"]["count"] - old["success"]["count"] == 2
    # perf_analyzer refuses statistics whose three compute counts differ.
    deltas = [stats[n]["count"] - old[n]["count"] for n in triton.COUNTER_OF if "compute" in n]
    assert deltas == [2, 2, 2]
    assert stats["compute_infer"]["ns"] > old["compute_infer"]["ns"]
    # The success time covers the stages.
    spent = {n: stats[n]["ns"] - old[n]["ns"] for n in stats}
    stages = (
        spent["queue"] + spent["compute_input"] + spent["compute_infer"] + spent["compute_output"]
    )
    assert spent["success"] >= stages
    assert stats["cache_hit"] == stats["cache_miss"] == {"count": 0, "ns": 0}
    # Every model: the one this server serves (and not the metadata of a model named "stats").
    assert _stat(client.get_inference_statistics())["name"] == spec.name


def test_failed_requests_count_as_fail(client, spec, served):
    before = _stat(client.get_inference_statistics(spec.name))["inference_stats"]
    with (
        swapped(
            served.state.repository.lookup().classifier,
            batcher=FailingBatcher(BatchFailedError("boom")),
        ),
        pytest.raises(InferenceServerException),
    ):
        infer(client, spec, 1)
    after = _stat(client.get_inference_statistics(spec.name))["inference_stats"]
    assert after["fail"]["count"] - before["fail"]["count"] == 1
    assert after["success"]["count"] == before["success"]["count"]


def test_repository_index_through_unload_and_load(client, spec, served):
    """The one model file served as a repository of one model: tritonclient unloads it (the
    server is then not ready, the index says why) and loads it again."""
    assert client.get_model_repository_index() == [
        {"name": spec.name, "version": spec.version, "state": "READY", "reason": ""}
    ]
    url = f"http://{served.http_url}/v2/repository/index"
    client.unload_model(spec.name)
    try:
        assert client.get_model_repository_index() == [
            {"name": spec.name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
        assert httpx.post(url, json={"ready": True}).json() == []
        assert not client.is_server_ready() and not client.is_model_ready(spec.name)
        with pytest.raises(InferenceServerException, match="is not loaded"):
            infer(client, spec, 1)
    finally:
        client.load_model(spec.name)
    assert client.is_server_ready() and client.is_model_ready(spec.name)
    infer(client, spec, 1)
    for body, needle in ((b"{nope", "not valid JSON"), (b'{"ready": "yes"}', "'ready'")):
        response = httpx.post(url, content=body)
        assert response.status_code == 400 and needle in response.json()["error"]


# --- the engine hooks the statistics come from ----------------------------------------------


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.batches: list[tuple] = []
        self.requests: list[tuple] = []

    def batch_finished(self, batch_id, started, ended, rows, error):
        self.batches.append((batch_id, ended - started, [ctx for ctx, _ in rows], error))

    def request_finished(self, ctx, started, seconds, error):
        self.requests.append((ctx, seconds, error))


def test_batcher_and_classifier_fill_in_the_stages(tiny_model_path):
    from service.engine.runtime import ModelRuntime

    runtime = ModelRuntime(tiny_model_path, provider="cpu")
    recorder = Recorder()
    seen = Recorder()
    observer = FanOut(recorder, seen)

    async def body():
        batcher = Batcher(runtime.run, item_shape=runtime.input_shape, observer=observer)
        batcher.start()
        classifier = Classifier(
            runtime, batcher, max_pixels=10**6, inline_decode_max_pixels=0, observer=observer
        )
        try:
            ctx = RequestContext(protocol="test")
            await classifier.classify_tensor(np.zeros((3, 1, 28, 28), np.float32), ctx)
            with (
                swapped(classifier, batcher=FailingBatcher(BatchFailedError("boom"))),
                pytest.raises(BatchFailedError),
            ):
                await classifier.classify_tensor(np.zeros((1, 1, 28, 28), np.float32))
            return ctx
        finally:
            await batcher.stop()

    ctx = asyncio.run(body())
    assert recorder.batches == seen.batches  # FanOut forwards every hook to every observer
    ids = [b[0] for b in recorder.batches]
    assert ids == sorted(set(ids)) and all(b[3] is None for b in recorder.batches)
    assert sum(len(b[2]) for b in recorder.batches) == 3
    assert all(c is ctx for b in recorder.batches for c in b[2])
    assert ctx.infer_s == max(b[1] for b in recorder.batches) > 0
    assert ctx.queue_s >= 0 and ctx.postprocess_s > 0 and ctx.decode_s == 0
    (done, seconds, error), (failed_ctx, _, failure) = recorder.requests
    assert done is ctx and error is None and seconds >= ctx.infer_s
    assert isinstance(failure, BatchFailedError) and failed_ctx.protocol == ""


def test_perf_analyzer_data_files_are_requests_the_server_takes(
    served, spec, tiny_model_path, make_png, capsys
):
    """What perf_analyzer sends from the files bench/perf_analyzer_data.py writes: a BYTES
    input's b64 data as raw tensor bytes, a tensor's content as FP32 for batch 1."""
    import base64
    import json

    from bench import perf_analyzer_data

    blobs = [make_png(seed=1), make_png(seed=2, size=40)]
    url = f"http://{served.http_url}/v2/models/{spec.name}/infer"
    for kind in ("image", "tensor"):
        paths = []
        for i, blob in enumerate(blobs):
            path = tiny_model_path.parent / f"pa-{kind}-{i}.png"
            path.write_bytes(blob)
            paths.append(str(path))
        assert perf_analyzer_data.main(["--model", str(tiny_model_path), f"--{kind}", *paths]) == 0
        (entry, _) = json.loads(capsys.readouterr().out)["data"]
        ((name, value),) = entry.items()
        if kind == "image":
            raw = base64.b64decode(value["b64"])
            item = {"name": name, "datatype": "BYTES", "shape": [1]}
        else:
            raw = np.asarray(value["content"], np.float32).tobytes()
            item = {"name": name, "datatype": "FP32", "shape": [1, *value["shape"]]}
        header = orjson.dumps({"inputs": [{**item, "parameters": {"binary_data_size": len(raw)}}]})
        response = httpx.post(
            url,
            content=header + raw,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert response.status_code == 200, (kind, response.text)
