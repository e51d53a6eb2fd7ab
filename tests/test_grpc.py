"""The gRPC Open Inference Protocol server, end to end on loopback: tritonclient.grpc (sync and
aio), a raw stub of our generated code, grpc.health.v1, the error model, deadlines, shared
batching with HTTP, graceful drain and the worker port group."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.server import free_port
from sepconv.spec import ModelSpec, read_spec
from service.engine.batcher import QueueFullError
from service.engine.observer import EngineObserver, FanOut
from service.protocols.oip_grpc import inference_pb2 as pb
from service.protocols.oip_grpc import inference_pb2_grpc as pb_grpc
from service.supervisor import bind_reuseport

from .conftest import FailingBatcher
from .waiting import wait_until

MAX_BODY = 256 * 1024


def _settings(model_path, **overrides):
    from service.settings import Settings

    values = dict(
        model_path=model_path,
        provider="cpu",
        warmup_runs=0,
        grpc_port=free_port(),
        max_body_bytes=MAX_BODY,
    )
    return Settings(**{**values, **overrides})


class Served:
    """uvicorn (HTTP, and the app's gRPC server) on free loopback ports in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        settings = app.state.settings
        self.http_port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.http_port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(self._started, "the server did not start")
        self.grpc_url = f"127.0.0.1:{settings.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"

    def _started(self) -> bool:
        if not self.thread.is_alive():
            raise RuntimeError("the server stopped during start-up")
        return self.server.started

    @property
    def state(self):
        return self.app.state

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_model_path):
    from service.api.app import create_app

    server = Served(create_app(_settings(tiny_model_path)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def spec(tiny_model_path) -> ModelSpec:
    return read_spec(str(tiny_model_path))


@pytest.fixture
def client(served):
    c = tgrpc.InferenceServerClient(served.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_model_path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        logits = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return run


def pixels(spec: ModelSpec, n: int, seed: int = 0) -> np.ndarray:
    shape = (n, spec.channels, spec.input_size, spec.input_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def fp32(x: np.ndarray) -> tgrpc.InferInput:
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def images(blobs: list[bytes]) -> tgrpc.InferInput:
    inp = tgrpc.InferInput("image", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return inp


def preprocessed(blobs: list[bytes], spec: ModelSpec) -> np.ndarray:
    from sepconv.preprocess import preprocess_bytes

    return np.stack([preprocess_bytes(b, spec, max_pixels=10**7) for b in blobs])


@contextlib.contextmanager
def swapped(obj, **values):
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


# --- tritonclient.grpc ------------------------------------------------------------------------


def test_health_and_metadata(client, spec):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(spec.name)
    assert client.is_model_ready(spec.name, spec.version)
    # Triton's answer for a model or version it does not serve: not ready, not an error.
    assert not client.is_model_ready("resnet50")
    assert not client.is_model_ready(spec.name, "999")
    server = client.get_server_metadata()
    assert server.name == "sepconv-serve"
    assert {"binary_tensor_data", "classification", "model_configuration", "statistics"} <= set(
        server.extensions
    )
    meta = client.get_model_metadata(spec.name, as_json=True)
    assert meta["name"] == spec.name and meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]] == ["input", "image"]
    assert meta["inputs"][0]["shape"] == ["-1", "1", "28", "28"]
    assert meta["outputs"][0]["shape"] == ["-1", "3"]


@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_tensor_matches_ort(client, spec, reference, rows):
    x = pixels(spec, rows, seed=rows)
    result = client.infer(spec.name, [fp32(x)], request_id="q-1")
    assert result.get_response().id == "q-1"
    assert result.get_response().model_version == spec.version
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (rows, 3)
    np.testing.assert_allclose(probs, reference(x), rtol=1e-5, atol=1e-6)


def test_images_and_classification(client, spec, reference, make_png):
    blobs = [make_png(seed=s, size=28 + 6 * s) for s in range(3)]
    top2 = tgrpc.InferRequestedOutput("probabilities", class_count=2)
    result = client.infer(spec.name, [images(blobs)], outputs=[top2])
    got = result.as_numpy("probabilities")
    assert got.shape == (3, 2)
    expected = reference(preprocessed(blobs, spec))
    for row, strings in enumerate(got):
        parsed = [s.decode().split(":") for s in strings]
        top = np.argsort(-expected[row], kind="stable")[:2]
        assert [int(p[1]) for p in parsed] == top.tolist()
        assert [p[2] for p in parsed] == [spec.labels[i] for i in top]
        np.testing.assert_allclose([float(p[0]) for p in parsed], expected[row, top], atol=1e-6)


def test_compressed_request(client, spec, reference):
    x = pixels(spec, 2, seed=9)
    result = client.infer(spec.name, [fp32(x)], compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(x), atol=1e-6)


def test_model_config_and_statistics(client, spec, served):
    config = client.get_model_config(spec.name).config
    assert config.name == spec.name and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == served.state.settings.max_batch_size
    assert [i.name for i in config.input] == ["input", "image"]
    assert list(config.input[0].dims) == [1, 28, 28] and config.input[0].data_type == 11  # FP32
    assert config.output[0].name == "probabilities" and list(config.output[0].dims) == [3]
    assert config.HasField("dynamic_batching")

    before = client.get_inference_statistics(spec.name).model_stats[0]
    client.infer(spec.name, [fp32(pixels(spec, 3, seed=4))])
    after = client.get_inference_statistics(spec.name).model_stats[0]
    assert after.name == spec.name and after.version == spec.version
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count > before.execution_count
    stats, old = after.inference_stats, before.inference_stats
    assert stats.success.count - old.success.count == 1
    assert stats.success.ns > old.success.ns
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(stats, name).count - getattr(old, name).count == 1, name
    assert stats.compute_infer.ns > old.compute_infer.ns
    # All models (empty name) is the same one model.
    assert client.get_inference_statistics().model_stats[0].name == spec.name
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [
        (spec.name, spec.version, "READY")
    ]


def test_unknown_model_is_not_found(client, spec):
    with pytest.raises(InferenceServerException) as info:
        client.infer("resnet50", [fp32(pixels(spec, 1))])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "resnet50" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config(spec.name, "999")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_bad_request_is_invalid_argument(client, spec):
    bad = tgrpc.InferInput("input", [1, 3, 28, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(spec.name, [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape must be [N,1,28,28]" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer(spec.name, [images([b"not an image"])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_message_over_the_body_limit_is_resource_exhausted(client, spec):
    x = np.zeros((MAX_BODY // (28 * 28 * 4) + 1, 1, 28, 28), np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer(spec.name, [fp32(x)])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_aio_client_concurrent_requests_get_their_own_results(served, spec, reference):
    async def main():
        async with tgrpc_aio.InferenceServerClient(served.grpc_url) as c:
            assert await c.is_model_ready(spec.name)
            xs = [pixels(spec, 1 + i % 3, seed=50 + i) for i in range(12)]
            results = await asyncio.gather(*(c.infer(spec.name, [fp32(x)]) for x in xs))
            stats = await c.get_inference_statistics(spec.name)
        for x, result in zip(xs, results, strict=True):
            np.testing.assert_allclose(result.as_numpy("probabilities"), reference(x), atol=1e-6)
        assert stats.model_stats[0].inference_count >= sum(len(x) for x in xs)

    asyncio.run(main())


# --- a raw stub, metadata, the error model --------------------------------------------------


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _details(error: grpc.RpcError) -> list:
    raw = dict(error.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    out = []
    for item in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if item.Is(kind.DESCRIPTOR):
                message = kind()
                item.Unpack(message)
                out.append(message)
    return out


def test_raw_stub_typed_contents_and_request_id(stub, spec, reference):
    x = pixels(spec, 2, seed=21)
    request = pb.ModelInferRequest(model_name=spec.name, id="oip-7")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "abc-123"),))
    assert dict(call.initial_metadata())["x-request-id"] == "abc-123"
    assert response.id == "oip-7" and response.outputs[0].datatype == "FP32"
    probs = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_allclose(probs, reference(x), atol=1e-6)
    # Without X-Request-ID, the OIP id names the request; without either, one is made.
    _, call = stub.ModelInfer.with_call(request)
    assert dict(call.initial_metadata())["x-request-id"] == "oip-7"
    _, call = stub.ServerLive.with_call(pb.ServerLiveRequest())
    assert dict(call.initial_metadata())["x-request-id"]


def test_invalid_argument_carries_the_error_code(stub, spec):
    request = pb.ModelInferRequest(model_name=spec.name)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input 'pixels'" in info.value.details()
    (error_info,) = _details(info.value)
    assert error_info.reason == "invalid_request" and error_info.domain == "sepconv-serve"


def test_overload_is_resource_exhausted_with_retry_info(served, stub, spec):
    classifier = served.state.repository.lookup().classifier
    with swapped(classifier, batcher=FailingBatcher(QueueFullError(512, 3))):
        request = pb.ModelInferRequest(model_name=spec.name)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
        request.raw_input_contents.append(np.zeros(784, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(error.trailing_metadata())
    assert trailers["grpc-retry-pushback-ms"] == "3000"
    error_info, retry = _details(error)
    assert error_info.reason == "overloaded"
    assert retry.retry_delay.seconds == 3


def test_not_ready_is_unavailable_and_health_follows(served, stub, spec):
    with grpc.insecure_channel(served.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with swapped(served.state.repository, started=False):
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=spec.name))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _details(info.value)[1].retry_delay.seconds == 1


class SlowBatcher:
    """Never answers in time; records the deadline each request brought."""

    max_queue_size = 512

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []
        self.cancelled = threading.Event()

    def runs_inline(self) -> bool:
        return False

    def enqueue(self, x, ctx=None, *, alone=False):
        self.deadlines.append(ctx.deadline if ctx is not None else None)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() and self.cancelled.set())
        return fut


def test_client_deadline_reaches_the_engine_and_cancels_the_work(served, client, spec):
    classifier = served.state.repository.lookup().classifier
    slow = SlowBatcher()
    with swapped(classifier, batcher=slow):
        sent = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.infer(spec.name, [fp32(pixels(spec, 1))], client_timeout=0.5)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert slow.cancelled.wait(10), "the server kept working after the deadline"
        # Triton's `timeout` parameter (microseconds) is a deadline too; the earlier one wins.
        with pytest.raises(InferenceServerException):
            client.infer(spec.name, [fp32(pixels(spec, 1))], timeout=200_000, client_timeout=5)
    first, second = slow.deadlines
    assert sent < first <= sent + 0.5 + 0.1
    assert second - first < 1.0  # 0.2 s from its own start, not 5 s


# --- one batcher for both transports ------------------------------------------------------------


class Gate:
    """Stands in for the batcher's ``run_batch``: holds each batch until opened.

    Swap it in with :func:`gated`: a lone request may run inline on the event loop, which a
    held run would block, and the batcher's measured time per image must not remember the
    held batch (admission control would refuse the next tests' requests).
    """

    def __init__(self, run) -> None:
        self.run = run
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, x):
        self.entered.set()
        self.opened.wait(30)
        return self.run(x)

    def wait_entered(self) -> None:
        assert self.entered.wait(10), "no batch reached the model"


def gated(batcher, gate: Gate, **more):
    return swapped(
        batcher, run_batch=gate, inline_max_s=0.0, image_seconds=batcher.image_seconds, **more
    )


def wait_queued(batcher, n: int) -> None:
    wait_until(lambda: batcher.depth >= n, lambda: f"only {batcher.depth} of {n} requests queued")


class BatchRecorder(EngineObserver):
    def __init__(self) -> None:
        self.batches: list[set[str]] = []

    def batch_finished(self, batch_id, started, ended, rows, error):
        self.batches.append({ctx.protocol for ctx, _ in rows if ctx is not None})


def test_grpc_and_http_requests_share_batches(served, spec):
    """Hold the model on a first batch, queue gRPC and HTTP requests behind it, release: the
    next batch holds both."""
    import httpx

    batcher = served.state.repository.lookup().classifier.batcher
    gate = Gate(batcher.run_batch)
    recorder = BatchRecorder()
    x = pixels(spec, 1, seed=3)
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 28, 28],
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    url = f"http://{served.http_url}/v2/models/{spec.name}/infer"
    results: list = []

    def via_http():
        results.append(httpx.post(url, content=body, timeout=30).status_code)

    def via_grpc():
        with tgrpc.InferenceServerClient(served.grpc_url) as c:
            results.append(c.infer(spec.name, [fp32(x)]).as_numpy("probabilities").shape)

    with gated(batcher, gate, observer=FanOut(batcher.observer, recorder)):
        first = threading.Thread(target=via_http)
        first.start()
        gate.wait_entered()
        threads = [threading.Thread(target=f) for f in (via_http, via_grpc, via_http, via_grpc)]
        for t in threads:
            t.start()
        wait_queued(batcher, 4)
        gate.opened.set()
        for t in [first, *threads]:
            t.join(30)
    assert sorted(map(str, results)) == sorted(["200"] * 3 + ["(1, 3)"] * 2)
    assert {"oip-rest", "oip-grpc"} in recorder.batches, recorder.batches


# --- start and stop ---------------------------------------------------------------------------


def test_grpc_off_with_port_zero(tiny_model_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(_settings(tiny_model_path, grpc_port=0))) as c:
        assert c.get("/readyz").status_code == 200
        assert not hasattr(c.app.state, "grpc_port")


def test_busy_grpc_port_stops_start_up(tiny_model_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    # Held the way another server's worker holds it, SO_REUSEPORT set: a lone server must not
    # join that group (and share its traffic) but fail.
    port = free_port()
    holder = bind_reuseport("127.0.0.1", port)
    holder.listen()
    try:
        app = create_app(_settings(tiny_model_path, grpc_port=port))
        with (
            pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"),
            TestClient(app),
        ):
            pass
    finally:
        holder.close()


def test_shutdown_drains_calls_in_flight(tiny_model_path, spec):
    from service.api.app import create_app

    server = Served(create_app(_settings(tiny_model_path, graceful_shutdown_s=10)))
    batcher = server.state.repository.lookup().classifier.batcher
    gate = batcher.run_batch = Gate(batcher.run_batch)
    batcher.inline_max_s = 0.0  # a held inline run would block the event loop
    outcome: list = []

    def call():
        with tgrpc.InferenceServerClient(server.grpc_url) as c:
            try:
                outcome.append(
                    c.infer(spec.name, [fp32(pixels(spec, 1))]).as_numpy("probabilities")
                )
            except InferenceServerException as exc:
                outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    gate.wait_entered()
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    # The server is shutting down with the call in flight; let the model answer now.
    wait_until(lambda: not server.state.repository.ready, "the server never began to stop")
    gate.opened.set()
    caller.join(30)
    stopper.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], np.ndarray), outcome
    with tgrpc.InferenceServerClient(server.grpc_url) as c, pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=2)


def test_draining_turns_readiness_and_health_off_but_keeps_serving(tiny_model_path, spec):
    """SIGTERM's drain delay (service.drain): balancers must see not-ready while calls run."""
    from service.api.app import create_app

    server = Served(create_app(_settings(tiny_model_path)))
    try:
        with grpc.insecure_channel(server.grpc_url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING
            server.state.drain.begin()  # what SIGTERM does
            wait_until(
                lambda: health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING,
                "health still SERVING while draining",
            )
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready
            # As over HTTP: the model is still loaded and answers; the server's readiness is
            # what takes it out of rotation.
            assert stub.ModelReady(pb.ModelReadyRequest(name=spec.name)).ready
        with tgrpc.InferenceServerClient(server.grpc_url) as c:
            probs = c.infer(spec.name, [fp32(pixels(spec, 1))]).as_numpy("probabilities")
        assert probs.shape == (1, 3)
    finally:
        server.stop()


@pytest.mark.slow
def test_workers_share_the_grpc_port(tmp_path, tiny_model_path, spec):
    from bench.server import ServerProcess, listeners
    from service.supervisor import reuseport_available

    if not reuseport_available():
        pytest.skip("needs SO_REUSEPORT")
    port = free_port()
    env = {"SEPCONV_WORKERS": "2", "SEPCONV_GRPC_PORT": str(port)}
    with ServerProcess(tiny_model_path, env, tmp_path / "log", ready_timeout_s=60):
        wait_until(lambda: listeners(port) >= 2, lambda: f"{listeners(port)} gRPC listeners")
        with tgrpc.InferenceServerClient(f"127.0.0.1:{port}") as c:
            assert c.is_model_ready(spec.name)
