"""Open Inference Protocol v2: the codec on its own, the routes in-process, and the real
``tritonclient.http`` client against a real server."""

from __future__ import annotations

import base64
import contextlib
import gzip
import struct

import numpy as np
import orjson
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

from sepconv.spec import ModelSpec
from service.engine.batcher import BatchFailedError, QueueFullError, RequestTimeoutError
from service.protocols import oip

from .conftest import FailingBatcher
from .waiting import wait_until

LABELS = ["circle", "square", "cross"]
SPEC = ModelSpec(
    name="tiny",
    version="7",
    labels=LABELS,
    input_size=4,
    color_mode="L",
    mean=[0.5],
    std=[0.25],
    alpha=0.25,
)


def encode(inputs, outputs=None, **kwargs) -> tuple[bytes, str | None]:
    """Build a request body exactly as tritonclient does; returns (body, header length)."""
    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs, **kwargs)
    return body, None if json_size is None else str(json_size)


def fp32_input(x: np.ndarray, binary: bool, name: str = "input") -> InferInput:
    inp = InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def image_input(images: list[bytes], binary: bool) -> InferInput:
    inp = InferInput(oip.IMAGE_INPUT, [len(images)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:
        b64 = [base64.b64encode(i) for i in images]
        inp.set_data_from_numpy(np.array(b64, dtype=np.object_), binary_data=False)
    return inp


def parse_error(body: bytes, header: str | None = None) -> str:
    with pytest.raises(oip.OIPError) as info:
        oip.parse_request(body, header, SPEC)
    assert info.value.status_code == 400
    return str(info.value)


def raw_request(doc: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = orjson.dumps(doc)
    return head + binary, (str(len(head)) if binary else None)


# --- codec: requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_parse_fp32_tensor_as_tritonclient_sends_it(binary):
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    body, header = encode([fp32_input(x, binary)], request_id="abc")
    req = oip.parse_request(body, header, SPEC)
    assert req.id == "abc"
    assert req.images is None
    assert req.tensor.dtype == np.float32 and req.tensor.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(req.tensor, x)
    assert req.batch_size == 3
    # No outputs named: tritonclient asks for every output in binary.
    assert req.outputs == () and req.binary_output is True


def test_parse_nested_json_data_is_row_major():
    x = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
    doc = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 4, 4], "data": x.tolist()}]
    }
    req = oip.parse_request(*raw_request(doc), SPEC)
    np.testing.assert_array_equal(req.tensor, x)
    assert req.binary_output is False


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary"])
def test_parse_image_bytes(binary):
    images = [b"\x89PNG\r\n\x1a\n\x00\xff", b"\x00", b"GIF89a" * 50]
    body, header = encode([image_input(images, binary)])
    req = oip.parse_request(body, header, SPEC)
    assert req.images == images and req.tensor is None and req.batch_size == 3


def test_parse_requested_outputs():
    x = np.zeros((1, 1, 4, 4), np.float32)
    outputs = [InferRequestedOutput("probabilities", binary_data=False, class_count=2)]
    req = oip.parse_request(*encode([fp32_input(x, True)], outputs), SPEC)
    assert req.outputs == (oip.RequestedOutput("probabilities", False, 2),)
    assert req.binary_output is False


def test_bytes_roundtrip_matches_tritonclient():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    elements = [b"", b"a", b"\x00" * 300, "é".encode()]
    ours = oip.serialize_bytes(elements)
    assert ours == serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()
    assert list(deserialize_bytes_tensor(ours)) == elements
    assert oip.deserialize_bytes(ours) == elements


def _tensor(**overrides) -> dict:
    item = {"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.0] * 16}
    return {"inputs": [{**item, **overrides}]}


def _image(**overrides) -> dict:
    item = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}
    return {"inputs": [{**item, **overrides}]}


def _out(**params) -> dict:
    return {**_tensor(), "outputs": [{"name": "probabilities", "parameters": params}]}


def _bin(doc: dict, size: int) -> dict:
    """Mark the only input as binary with ``binary_data_size`` = size (and drop its data)."""
    item = {k: v for k, v in doc["inputs"][0].items() if k != "data"}
    return {"inputs": [{**item, "parameters": {"binary_data_size": size}}]}


BAD_JSON = [
    ([1, 2], "JSON object"),
    ({}, "'inputs'"),
    ({"inputs": []}, "'inputs'"),
    ({"inputs": [{"name": "pixels"}]}, "unknown input 'pixels'"),
    ({"inputs": [_tensor()["inputs"][0], _image()["inputs"][0]]}, "exactly one input"),
    (_tensor(datatype="FP64"), "datatype must be FP32"),
    (_tensor(datatype="INT8"), "datatype must be FP32"),
    (_tensor(shape=[1, 3, 4, 4]), "shape must be [N,1,4,4]"),
    (_tensor(shape=[0, 1, 4, 4], data=[]), "N >= 1"),
    (_tensor(shape=[16]), "shape must be"),
    (_tensor(shape=[1, 1, 4, -4]), "non-negative integers"),
    (_tensor(shape="1x1x4x4"), "non-negative integers"),
    (_tensor(data=[0.0] * 15), "has 16 elements, 'data' has 15"),
    (_tensor(data=["a"] * 16), "only numbers"),
    (_tensor(data=[True] * 16), "only numbers"),
    (_tensor(data=None), "only numbers"),
    (_tensor(data=[[0.0] * 8, [0.0] * 7]), "regular array"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1]}]}, "neither 'data'"),
    (_tensor(parameters={"shared_memory_region": "r"}), "shared-memory"),
    ({"id": 5, **_tensor()}, "'id' must be a string"),
    ({**_tensor(), "parameters": []}, "'parameters'"),
    ({**_tensor(), "parameters": {"binary_data_output": 1}}, "binary_data_output"),
    ({**_tensor(), "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ({**_tensor(), "outputs": [{"name": "probabilities"}] * 2}, "requested twice"),
    (_out(classification=-1), "classification"),
    (_out(classification=1.5), "classification"),
    (_out(binary_data="yes"), "binary_data"),
    (_image(datatype="FP32"), "datatype must be BYTES"),
    (_image(shape=[1, 2], data=["AA==", "AA=="]), "[N] or [N,1]"),
    (_image(data=["not base64!"]), "not valid base64"),
    (_image(shape=[2]), "says 2 images, got 1"),
    (_image(data=[3]), "base64 strings"),
]

BAD_BINARY = [
    (_bin(_tensor(), 64), b"\x00" * 60, "only 60 bytes"),
    (_bin(_tensor(), 60), b"\x00" * 60, "needs 64 bytes"),
    (_bin(_tensor(), 64), b"\x00" * 65, "1 bytes of binary data"),
    (_bin(_tensor(), -1), b"\x00", "non-negative integer"),
    (_bin(_image(), 6), struct.pack("<I", 5) + b"ab", "declares 5 bytes"),
    (_bin(_image(), 2), b"ab", "length prefix"),
]


@pytest.mark.parametrize(("doc", "needle"), BAD_JSON)
def test_malformed_json_requests_are_400_naming_the_problem(doc, needle):
    assert needle in parse_error(orjson.dumps(doc))


@pytest.mark.parametrize(("doc", "binary", "needle"), BAD_BINARY)
def test_malformed_binary_requests_are_400_naming_the_problem(doc, binary, needle):
    assert needle in parse_error(*raw_request(doc, binary))


@pytest.mark.parametrize(
    ("body", "header", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (orjson.dumps(_tensor()) + b"\x00" * 64, None, f"needs a {oip.HEADER_LENGTH} header"),
        (orjson.dumps(_tensor()), "abc", "must be an integer"),
        (orjson.dumps(_tensor()), "0", "length of the JSON part"),
        (orjson.dumps(_tensor()), "99999", "length of the JSON part"),
        (orjson.dumps(_tensor()), "10", "not valid JSON"),
    ],
)
def test_bad_body_framing_is_400(body, header, needle):
    assert needle in parse_error(body, header)


def test_non_finite_binary_tensor_is_rejected():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 2] = np.nan
    assert "NaN or infinity" in parse_error(*encode([fp32_input(x, True)]))


# --- codec: responses --------------------------------------------------------------------------


def _request(outputs=(), binary_output=False, request_id=None) -> oip.InferRequest:
    return oip.InferRequest(
        id=request_id,
        tensor=np.zeros((2, 1, 4, 4), np.float32),
        images=None,
        outputs=tuple(outputs),
        binary_output=binary_output,
    )


PROBS = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)


def decode(body: bytes, header_length: int | None):
    return InferenceServerClient.parse_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_response_probabilities_decode_with_tritonclient(binary):
    req = _request([oip.RequestedOutput("probabilities", binary, 0)], request_id="r1")
    body, header_len = oip.build_response(
        model_name="tiny", model_version="7", request=req, probs=PROBS, labels=LABELS
    )
    assert (header_len is not None) == binary
    result = decode(body, header_len)
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, PROBS)
    response = result.get_response()
    assert response["id"] == "r1"
    assert response["model_name"] == "tiny" and response["model_version"] == "7"
    if not binary:
        # Flat, row-major, and each value the shortest text that reads back as the same float32.
        data = orjson.loads(body)["outputs"][0]["data"]
        assert data == [0.1, 0.7, 0.2, 0.5, 0.2, 0.3]


def test_response_defaults_follow_binary_data_output():
    body, header_len = oip.build_response(
        model_name="tiny",
        model_version="7",
        request=_request(binary_output=True),
        probs=PROBS,
        labels=LABELS,
    )
    assert header_len is not None and len(body) == header_len + PROBS.nbytes
    np.testing.assert_array_equal(decode(body, header_len).as_numpy("probabilities"), PROBS)
    assert "id" not in orjson.loads(body[:header_len])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_response_classification_top_k(binary):
    req = _request([oip.RequestedOutput("probabilities", binary, 2)])
    body, header_len = oip.build_response(
        model_name="tiny", model_version="7", request=req, probs=PROBS, labels=LABELS
    )
    result = decode(body, header_len)
    assert result.get_output("probabilities")["datatype"] == "BYTES"
    got = result.as_numpy("probabilities")
    assert got.shape == (2, 2)
    assert [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got] == [
        ["0.700000:1:square", "0.200000:2:cross"],
        ["0.500000:0:circle", "0.300000:2:cross"],
    ]


def test_classification_count_above_classes_returns_all_classes():
    strings = oip.classification_strings(PROBS, 10, LABELS)
    assert len(strings) == 6
    assert [s.split(b":")[1] for s in strings] == [b"1", b"2", b"0", b"0", b"2", b"1"]


def test_metadata_documents():
    meta = oip.model_metadata(SPEC)
    assert meta["name"] == "tiny" and meta["versions"] == ["7"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]} in meta["inputs"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    server = oip.server_metadata("1.2.3")
    assert server["version"] == "1.2.3"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])


# --- the routes, in-process --------------------------------------------------------------------


def _settings(model_path, **overrides):
    from service.settings import Settings

    return Settings(model_path=model_path, provider="cpu", warmup_runs=0, **overrides)


@pytest.fixture(scope="module")
def client(tiny_model_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(_settings(tiny_model_path))) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_spec(tiny_model_path) -> ModelSpec:
    from sepconv.spec import read_spec

    return read_spec(str(tiny_model_path))


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """Probabilities from a plain ORT session on the same file: what the server must return."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_model_path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        logits = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return run


def _pixels(spec: ModelSpec, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, spec.channels, spec.input_size, spec.input_size)
    return rng.standard_normal(shape).astype(np.float32)


def _preprocessed(images: list[bytes], spec: ModelSpec) -> np.ndarray:
    from sepconv.preprocess import preprocess_bytes

    return np.stack([preprocess_bytes(i, spec, max_pixels=10**7) for i in images])


def _infer_url(spec: ModelSpec) -> str:
    return f"/v2/models/{spec.name}/infer"


def test_routes_metadata_and_health(client, tiny_spec):
    server = client.get("/v2").json()
    assert server["name"] == "sepconv-serve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get(f"/v2/models/{tiny_spec.name}").json()
    assert meta == oip.model_metadata(tiny_spec)
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    versioned = client.get(f"/v2/models/{tiny_spec.name}/versions/{tiny_spec.version}")
    assert versioned.json() == meta
    ready = client.get(f"/v2/models/{tiny_spec.name}/ready")
    assert ready.status_code == 200 and ready.json() == {"name": tiny_spec.name, "ready": True}


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/resnet50",
        "/v2/models/resnet50/ready",
        "/v2/models/tiny-l/versions/999",
        "/v2/models/tiny-l/versions/999/ready",
    ],
)
def test_unknown_model_or_version_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    assert "999" in response.json()["error"] or "resnet50" in response.json()["error"]
    post = client.post(path.removesuffix("/ready") + "/infer", content=orjson.dumps(_tensor()))
    assert post.status_code == 404 and "error" in post.json()


def test_json_tensor_infer_matches_ort(client, tiny_spec, reference):
    x = _pixels(tiny_spec, 3)
    doc = {
        "id": "q1",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ],
    }
    response = client.post(_infer_url(tiny_spec), content=orjson.dumps(doc))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "q1" and body["model_name"] == tiny_spec.name
    (out,) = body["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [3, 3]
    probs = np.array(out["data"], np.float64).reshape(3, 3)
    np.testing.assert_allclose(probs, reference(x), rtol=1e-5, atol=1e-6)


def test_binary_image_infer_matches_ort_on_the_same_preprocessing(
    client, tiny_spec, reference, make_png
):
    images = [make_png(seed=1, size=40), make_png(seed=2, size=28, mode="RGB")]
    body, header = encode(
        [image_input(images, binary=True)],
        [InferRequestedOutput("probabilities", binary_data=True)],
    )
    response = client.post(_infer_url(tiny_spec), content=body, headers={oip.HEADER_LENGTH: header})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header_len = int(response.headers[oip.HEADER_LENGTH])
    probs = decode(response.content, header_len).as_numpy("probabilities")
    expected = reference(_preprocessed(images, tiny_spec))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_gzip_request_body_is_accepted(client, tiny_spec, reference):
    x = _pixels(tiny_spec, 1, seed=3)
    body, header = encode(
        [fp32_input(x, binary=True)], [InferRequestedOutput("probabilities", binary_data=False)]
    )
    response = client.post(
        _infer_url(tiny_spec),
        content=gzip.compress(body),
        headers={oip.HEADER_LENGTH: header, "Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    probs = np.array(response.json()["outputs"][0]["data"]).reshape(1, 3)
    np.testing.assert_allclose(probs, reference(x), rtol=1e-5, atol=1e-6)


GZIPPED = gzip.compress(orjson.dumps(_tensor()))


@pytest.mark.parametrize(
    ("content", "headers", "status", "needle"),
    [
        (b"{oops", {}, 400, "not valid JSON"),
        (orjson.dumps(_tensor()), {}, 400, "shape must be [N,1,28,28]"),
        (orjson.dumps({"inputs": [{"name": "x"}]}), {}, 400, "unknown input 'x'"),
        (orjson.dumps(_image()), {}, 400, "cannot identify image format"),
        (orjson.dumps(_tensor()), {oip.HEADER_LENGTH: "-3"}, 400, "length of the JSON part"),
        (orjson.dumps(_tensor()), {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (b"plain text", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
        (GZIPPED[:-12], {"Content-Encoding": "gzip"}, 400, "truncated gzip"),
    ],
)
def test_bad_infer_requests_are_4xx_json(client, tiny_spec, content, headers, status, needle):
    response = client.post(_infer_url(tiny_spec), content=content, headers=headers)
    assert response.status_code == status
    assert needle in response.json()["error"]


def test_oversized_and_decompression_bomb_bodies_are_413(tiny_model_path, tiny_spec):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(_settings(tiny_model_path, max_body_bytes=4096))) as c:
        big = c.post(_infer_url(tiny_spec), content=b" " * 5000)
        assert big.status_code == 413 and "error" in big.json()
        bomb = gzip.compress(b" " * 100_000)
        assert len(bomb) < 4096
        r = c.post(_infer_url(tiny_spec), content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "4096" in r.json()["error"]


def test_too_many_rows_for_the_queue_is_413(tiny_model_path, tiny_spec):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = _settings(tiny_model_path, max_batch_size=2, max_queue_size=4)
    with TestClient(create_app(settings)) as c:
        x = _pixels(tiny_spec, 5)
        body, header = encode([fp32_input(x, binary=True)])
        r = c.post(_infer_url(tiny_spec), content=body, headers={oip.HEADER_LENGTH: header})
        assert r.status_code == 413 and "at most 4" in r.json()["error"]


@contextlib.contextmanager
def swapped_state(client, **values):
    """Swap the repository's attributes (``batcher``: the classifier's) for a while."""
    state = client.app.state.repository
    if "batcher" in values:
        state = state.lookup().classifier
    saved = {name: getattr(state, name) for name in values}
    for name, value in values.items():
        setattr(state, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(state, name, value)


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (QueueFullError(512, 3), 429, "3"),
        (RequestTimeoutError("no result in 10 s"), 504, None),
        (BatchFailedError("ORT exploded"), 500, None),
    ],
)
def test_batcher_errors_map_to_status_codes(client, tiny_spec, exc, status, retry_after):
    x = _pixels(tiny_spec, 2)
    body, header = encode([fp32_input(x, binary=True)])
    with swapped_state(client, batcher=FailingBatcher(exc)):
        r = client.post(_infer_url(tiny_spec), content=body, headers={oip.HEADER_LENGTH: header})
    assert r.status_code == status
    assert str(exc) in r.json()["error"]
    assert r.headers.get("retry-after") == retry_after


def test_not_ready_is_503(client, tiny_spec):
    with swapped_state(client, started=False):
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200
        r = client.post(_infer_url(tiny_spec), content=orjson.dumps(_tensor()))
        assert client.get(f"/v2/models/{tiny_spec.name}/ready").status_code == 503
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert client.get("/v2/health/ready").status_code == 200


# --- the real tritonclient against a real server ------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tiny_model_path):
    """uvicorn on a free loopback port in a background thread, stopped at teardown."""
    import socket
    import threading

    import uvicorn

    from service.api.app import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(_settings(tiny_model_path)), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("uvicorn stopped during start-up")
        return server.started

    wait_until(started, "uvicorn did not start")
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def triton(server_url):
    c = InferenceServerClient(server_url)
    yield c
    c.close()


def test_tritonclient_health_and_metadata(triton, tiny_spec):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(tiny_spec.name)
    assert triton.is_model_ready(tiny_spec.name, model_version=tiny_spec.version)
    assert not triton.is_model_ready("resnet50")
    server = triton.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata(tiny_spec.name)
    assert meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]] == ["input", "image"]


def test_tritonclient_unknown_model_raises_with_404(triton):
    from tritonclient.utils import InferenceServerException

    x = np.zeros((1, 1, 28, 28), np.float32)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("resnet50", [fp32_input(x, binary=True)])
    assert info.value.status() == "404"
    assert "resnet50" in info.value.message()


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_tritonclient_fp32_tensor(triton, tiny_spec, reference, binary_in, binary_out):
    x = _pixels(tiny_spec, 4, seed=10)
    result = triton.infer(
        tiny_spec.name,
        [fp32_input(x, binary_in)],
        outputs=[InferRequestedOutput("probabilities", binary_data=binary_out)],
        request_id="r-7",
    )
    assert result.get_response()["id"] == "r-7"
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (4, 3)
    np.testing.assert_allclose(probs, reference(x), rtol=1e-5, atol=1e-6)


def test_tritonclient_default_outputs_and_versioned_url(triton, tiny_spec, reference):
    x = _pixels(tiny_spec, 1, seed=11)
    result = triton.infer(tiny_spec.name, [fp32_input(x, True)], model_version=tiny_spec.version)
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary"])
def test_tritonclient_image_input(triton, tiny_spec, reference, make_png, binary):
    images = [make_png(seed=s, size=28 + 4 * s) for s in range(3)]
    result = triton.infer(
        tiny_spec.name,
        [image_input(images, binary)],
        outputs=[InferRequestedOutput("probabilities", binary_data=binary)],
    )
    expected = reference(_preprocessed(images, tiny_spec))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_classification(triton, tiny_spec, reference, binary):
    x = _pixels(tiny_spec, 2, seed=12)
    result = triton.infer(
        tiny_spec.name,
        [fp32_input(x, binary)],
        outputs=[InferRequestedOutput("probabilities", binary_data=binary, class_count=2)],
    )
    got = result.as_numpy("probabilities")
    assert got.shape == (2, 2)
    expected = reference(x)
    for row, strings in enumerate(got):
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in strings]
        top = np.argsort(-expected[row], kind="stable")[:2]
        assert [int(p[1]) for p in parsed] == top.tolist()
        assert [p[2] for p in parsed] == [tiny_spec.labels[i] for i in top]
        np.testing.assert_allclose([float(p[0]) for p in parsed], expected[row, top], atol=1e-6)


def test_tritonclient_gzip_request(triton, tiny_spec, reference):
    x = _pixels(tiny_spec, 2, seed=13)
    result = triton.infer(
        tiny_spec.name, [fp32_input(x, True)], request_compression_algorithm="gzip"
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(x), rtol=1e-5, atol=1e-6)


def test_tritonclient_concurrent_requests_get_their_own_results(server_url, tiny_spec, reference):
    """Concurrent requests share batches in the batcher; each must get back its own rows."""
    c = InferenceServerClient(server_url, concurrency=8)
    try:
        xs = [_pixels(tiny_spec, 1 + i % 3, seed=100 + i) for i in range(24)]
        pending = [c.async_infer(tiny_spec.name, [fp32_input(x, True)]) for x in xs]
        for x, p in zip(xs, pending, strict=True):
            probs = p.get_result().as_numpy("probabilities")
            np.testing.assert_allclose(probs, reference(x), rtol=1e-5, atol=1e-6)
    finally:
        c.close()
