"""The HTTP service end to end on the tiny session model: lifespan, endpoints, errors, metrics."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import shutil
import subprocess

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY

from sepconv.preprocess import preprocess_bytes
from sepconv.spec import read_spec
from service.api.app import create_app
from service.engine.batcher import (
    BatchFailedError,
    InvalidInputError,
    QueueFullError,
    RequestTimeoutError,
)
from service.engine.postprocess import softmax
from service.engine.runtime import ModelLoadError, ModelRuntime
from service.settings import Settings

from .conftest import TINY_LABELS, FailingBatcher, png_bytes

PNG = {"content-type": "image/png"}


def _settings(path, **kw) -> Settings:
    return Settings(model_path=path, warmup_runs=1, **kw)


@pytest.fixture(scope="module")
def client(tiny_model_path):
    with TestClient(create_app(_settings(tiny_model_path))) as c:
        yield c


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _direct_probs(model_path, blob: bytes) -> np.ndarray:
    """What a plain single-image ORT run says about an image: the reference answer."""
    spec = read_spec(str(model_path))
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = preprocess_bytes(blob, spec, max_pixels=10**8)[None]
    return softmax(sess.run(None, {spec.input_name: x})[0])[0]


# --- lifespan and health


def test_readiness_before_and_after_load(tiny_model_path):
    app = create_app(_settings(tiny_model_path))
    c = TestClient(app)  # no `with`: the lifespan has not run, the model is not loaded
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    assert r.headers["retry-after"] == "1"
    r = c.post("/v1/classify", content=png_bytes(np.zeros((28, 28), np.uint8)), headers=PNG)
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    with c:
        assert c.get("/readyz").json() == {"status": "ready"}
        assert app.state.repository.lookup().classifier.runtime.providers == [
            "CPUExecutionProvider"
        ]
    assert c.get("/readyz").status_code == 503  # shut down: not ready any more


def test_start_up_heap_is_frozen_out_of_the_gc(tiny_model_path):
    gc.unfreeze()
    with TestClient(create_app(_settings(tiny_model_path))):
        # The long-lived start-up objects (session, app) are out of the collector's sight.
        assert gc.get_freeze_count() > 1000


def test_models_endpoint_reports_the_metadata(client, tiny_model_path):
    body = client.get("/v1/models").json()
    assert (body["name"], body["version"]) == ("tiny-l", "test")
    assert body["labels"] == TINY_LABELS and body["num_classes"] == 3
    assert body["input"]["shape"] == ["batch", 1, 28, 28]
    assert (body["input"]["color_mode"], body["input"]["mean"]) == ("L", [0.5])
    assert body["providers"] == ["CPUExecutionProvider"]
    assert (body["alpha"], body["accuracy"]) == (0.25, 0.5)
    assert body["optimization"] == {"conv": "separable", "precision": "fp32",
                                    "prune_ratio": 0.0, "widths": None, "teacher": ""}  # fmt: skip


def test_missing_model_fails_the_lifespan(tmp_path):
    with (
        pytest.raises(ModelLoadError, match="does not exist"),
        TestClient(create_app(_settings(tmp_path / "missing.onnx"))),
    ):
        pass


def test_model_without_metadata_is_refused(tmp_path, tiny_model_path):
    import onnx

    proto = onnx.load(str(tiny_model_path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, bare)
    with pytest.raises(ModelLoadError, match="no sepconv metadata"):
        ModelRuntime(bare)


def test_metadata_that_contradicts_the_graph_is_refused(tmp_path, tiny_model_path):
    import onnx

    proto = onnx.load(str(tiny_model_path))
    for prop in proto.metadata_props:
        if prop.key == "sepconv.input_size":
            prop.value = "32"  # the graph takes 28 px
    lying = tmp_path / "lying.onnx"
    onnx.save(proto, lying)
    with pytest.raises(ModelLoadError, match="does not match the metadata"):
        ModelRuntime(lying)


def test_cuda_requested_without_cuda_fails_clearly(tiny_model_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    with pytest.raises(ModelLoadError, match="SEPCONV_PROVIDER=cuda"):
        ModelRuntime(tiny_model_path, provider="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu with a CUDA device",
)
def test_cuda_provider_serves_the_same_answers(tiny_model_path, make_png):
    blob = make_png(3)
    with TestClient(create_app(_settings(tiny_model_path, provider="cuda"))) as c:
        assert c.get("/v1/models").json()["providers"][0] == "CUDAExecutionProvider"
        r = c.post("/v1/classify", content=blob, headers=PNG)
    assert r.status_code == 200
    served = {p["index"]: p["probability"] for p in r.json()["results"][0]["predictions"]}
    expected = _direct_probs(tiny_model_path, blob)
    for i, p in served.items():
        assert p == pytest.approx(float(expected[i]), abs=1e-4)


# --- classify


def test_raw_body_classify(client, make_png, tiny_model_path):
    blob = make_png(1)
    r = client.post("/v1/classify", content=blob, headers=PNG)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"] == {"name": "tiny-l", "version": "test"}
    [result] = body["results"]
    assert result["filename"] is None
    preds = result["predictions"]
    assert len(preds) == 3  # default top_k=5, clamped to the 3 classes
    assert sorted(p["index"] for p in preds) == [0, 1, 2]
    assert [p["probability"] for p in preds] == sorted(
        (p["probability"] for p in preds), reverse=True
    )
    expected = _direct_probs(tiny_model_path, blob)
    for p in preds:
        assert p["label"] == TINY_LABELS[p["index"]]
        assert p["probability"] == pytest.approx(float(expected[p["index"]]), abs=1e-6)


def test_multipart_several_files_keep_their_order(client, make_png, tiny_model_path):
    blobs = [make_png(s) for s in (10, 11, 12)]
    files = [("file", (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    r = client.post("/v1/classify", params={"top_k": 2}, files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["img0.png", "img1.png", "img2.png"]
    for blob, res in zip(blobs, results, strict=True):
        assert len(res["predictions"]) == 2
        expected = _direct_probs(tiny_model_path, blob)
        assert res["predictions"][0]["index"] == int(np.argmax(expected))
        assert res["predictions"][0]["probability"] == pytest.approx(expected.max(), abs=1e-6)


def test_served_tensor_is_the_shared_preprocessing(tiny_rgb_model_path):
    """The tensor that reaches ORT equals sepconv.preprocess's output for the same bytes."""
    rng = np.random.default_rng(5)
    blob = png_bytes(rng.integers(0, 256, (45, 60, 4), dtype=np.uint8), "RGBA")
    spec = read_spec(str(tiny_rgb_model_path))
    expected = preprocess_bytes(blob, spec, max_pixels=10**8)
    seen = []
    with TestClient(create_app(_settings(tiny_rgb_model_path))) as c:
        batcher = c.app.state.repository.lookup().classifier.batcher
        inner = batcher.run_batch

        def spy(x):
            seen.append(x.copy())
            return inner(x)

        batcher.run_batch = spy
        r = c.post("/v1/classify", files={"file": ("a.png", blob, "image/png")})
    assert r.status_code == 200
    assert len(seen) == 1 and seen[0].shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(seen[0][0], expected)


@pytest.mark.parametrize("shape", [(224, 224, 3), (4, 28, 28, 1), (2, 9, 7, 3)])
def test_table_normalize_is_bit_identical_to_the_formula(shape):
    """normalize() looks uint8 values up in a table; it must equal the float32 formula exactly."""
    from sepconv.preprocess import normalize
    from sepconv.spec import ModelSpec

    c = shape[-1]
    spec = ModelSpec(
        labels=["a"],
        input_size=8,
        color_mode="L" if c == 1 else "RGB",
        mean=[0.485, 0.456, 0.406][:c],
        std=[0.229, 0.224, 0.225][:c],
        alpha=1,
    )
    px = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    mean, std = np.float32(spec.mean), np.float32(spec.std)
    formula = (px.astype(np.float32) * np.float32(1 / 255) - mean) / std
    expected = np.moveaxis(formula, -1, -3)
    out = normalize(px, spec)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(normalize(px.astype(np.float32), spec), expected)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.new("L", (40, 20), 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return _encode(img, "JPEG", exif=exif)


@pytest.mark.parametrize(
    "blob, ctype",
    [
        (_exif_rotated(), "image/jpeg"),
        (_encode(Image.new("RGBA", (30, 30), (200, 10, 10, 128)), "PNG"), "image/png"),
        (_encode(Image.new("P", (30, 30), 7), "GIF"), "image/gif"),
        (_encode(Image.new("I;16", (30, 30), 40000), "TIFF"), "image/tiff"),
        (_encode(Image.new("CMYK", (30, 30), (0, 50, 100, 0)), "JPEG"), "image/jpeg"),
        (_encode(Image.new("RGB", (50, 30), (1, 2, 3)), "WEBP"), "image/webp"),
        (_encode(Image.new("L", (28, 28), 9), "BMP"), "image/bmp"),
    ],
    ids=["exif-jpeg", "rgba", "palette-gif", "16-bit-tiff", "cmyk-jpeg", "webp", "bmp"],
)
def test_unusual_images_are_served(client, blob, ctype, tiny_model_path):
    r = client.post("/v1/classify", content=blob, headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]["predictions"][0]
    expected = _direct_probs(tiny_model_path, blob)
    assert top["index"] == int(np.argmax(expected))


def test_concurrent_distinct_images_each_get_their_own_answer(tiny_model_path):
    """32 different images at once, batched together: each response must match a direct,
    single-image ORT run on that image and no other."""
    n = 32
    rng = np.random.default_rng(123)
    # Strongly different images so the reference answers differ between images.
    blobs = [
        png_bytes(np.clip(rng.normal(i * 8, 40, (28, 28)), 0, 255).astype(np.uint8))
        for i in range(n)
    ]
    expected = [_direct_probs(tiny_model_path, b) for b in blobs]
    assert len({tuple(np.round(e, 5)) for e in expected}) == n
    # Inline runs off: in-process requests never overlap, and this test is about shared batches.
    app = create_app(
        _settings(tiny_model_path, max_batch_size=8, max_wait_ms=5, inline_inference_max_ms=0)
    )
    sizes = []

    async def main():
        async with app.router.lifespan_context(app):
            batcher = app.state.repository.lookup().classifier.batcher
            inner = batcher.run_batch

            def spy(x):
                sizes.append(len(x))
                return inner(x)

            batcher.run_batch = spy
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await asyncio.gather(
                    *(c.post("/v1/classify", content=b, headers=PNG) for b in blobs)
                )

    responses = asyncio.run(main())
    for resp, exp in zip(responses, expected, strict=True):
        assert resp.status_code == 200
        got = np.zeros(3)
        for p in resp.json()["results"][0]["predictions"]:
            got[p["index"]] = p["probability"]
        np.testing.assert_allclose(got, exp, atol=1e-6)
    assert sum(sizes) == n and max(sizes) > 1  # they really shared batches


# --- errors: always JSON {"error", "detail"}, never a 500 for bad input


def _assert_error(r: httpx.Response, status: int, error: str, detail_part: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert detail_part in body["detail"]


def test_undecodable_and_truncated_images_are_400(client, make_png):
    _assert_error(
        client.post("/v1/classify", content=b"GIF89a not really", headers=PNG),
        400,
        "invalid_image",
    )
    _assert_error(
        client.post("/v1/classify", content=make_png(1)[:60], headers=PNG),
        400,
        "invalid_image",
        "truncated",
    )
    _assert_error(client.post("/v1/classify", content=b"", headers=PNG), 400, "invalid_image")
    files = [
        ("file", ("ok.png", make_png(1), "image/png")),
        ("file", ("bad.png", b"xx", "image/png")),
    ]
    _assert_error(client.post("/v1/classify", files=files), 400, "invalid_image", "bad.png")


def test_body_over_limit_is_413_by_content_length(tiny_model_path):
    with TestClient(create_app(_settings(tiny_model_path, max_body_bytes=1000))) as c:
        r = c.post("/v1/classify", content=b"\x89PNG" + b"0" * 2000, headers=PNG)
        _assert_error(r, 413, "body_too_large", "1000 bytes")
        assert (
            _sample(
                "sepconv_http_requests_total", route="/v1/classify", method="POST", status="413"
            )
            >= 1
        )


def _raw_asgi_post(app, chunks: int, chunk: bytes, headers: list) -> tuple[int, dict, int]:
    """POST straight through ASGI, streaming ``chunks`` messages; returns how many were pulled."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < chunks}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def main():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(main())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_chunked_body_over_limit_is_413_while_streaming(tiny_model_path):
    app = create_app(_settings(tiny_model_path, max_body_bytes=4096))
    # No Content-Length (chunked): counted while streaming, refused once past the limit.
    status, body, pulled = _raw_asgi_post(app, 100, b"x" * 512, [(b"content-type", b"image/png")])
    assert (status, body["error"]) == (413, "body_too_large")
    assert pulled == 9  # 9 x 512 > 4096: not one chunk more
    # A declared length over the limit is refused before the first read.
    headers = [(b"content-type", b"image/png"), (b"content-length", b"51200")]
    status, body, pulled = _raw_asgi_post(app, 100, b"x" * 512, headers)
    assert (status, body["error"], pulled) == (413, "body_too_large", 0)
    with TestClient(app) as c:
        files = {"file": ("big.png", b"y" * 8000, "image/png")}
        _assert_error(c.post("/v1/classify", files=files), 413, "body_too_large")


def test_decompression_bomb_is_413(tiny_model_path):
    big = png_bytes(np.zeros((100, 100), np.uint8))
    with TestClient(create_app(_settings(tiny_model_path, max_pixels=5000))) as c:
        _assert_error(
            c.post("/v1/classify", content=big, headers=PNG), 413, "image_too_large", "10000"
        )


def test_unsupported_media_types_are_415(client, make_png):
    _assert_error(
        client.post("/v1/classify", content=b"hi", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
        "text/plain",
    )
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    _assert_error(
        client.post("/v1/classify", content=svg, headers={"content-type": "image/svg+xml"}),
        415,
        "unsupported_media_type",
    )
    _assert_error(client.post("/v1/classify", content=make_png(1)), 415, "unsupported_media_type")
    files = {"file": ("notes.txt", b"hello", "text/plain")}
    _assert_error(client.post("/v1/classify", files=files), 415, "unsupported_media_type")


def test_bad_parameters_are_422(client, make_png):
    blob = make_png(1)
    _assert_error(
        client.post("/v1/classify?top_k=0", content=blob, headers=PNG),
        422,
        "invalid_parameter",
        "top_k",
    )
    _assert_error(
        client.post("/v1/classify?top_k=many", content=blob, headers=PNG),
        422,
        "invalid_parameter",
        "top_k",
    )
    r = client.post("/v1/classify", data={"image": "x"}, files={"other": ("a.png", blob)})
    _assert_error(r, 422, "missing_file", "`file`")
    r = client.post("/v1/classify?top_k=1", content=blob, headers=PNG)
    assert len(r.json()["results"][0]["predictions"]) == 1


def test_multipart_problems(tiny_model_path, make_png):
    with TestClient(create_app(_settings(tiny_model_path, max_images_per_request=2))) as c:
        files = [("file", (f"{i}.png", make_png(i), "image/png")) for i in range(3)]
        _assert_error(c.post("/v1/classify", files=files), 413, "too_many_images", "at most 2")
        broken = {"content-type": "multipart/form-data"}  # no boundary
        _assert_error(
            c.post("/v1/classify", content=b"abc", headers=broken), 400, "invalid_multipart"
        )


def test_unknown_route_and_method(client):
    _assert_error(client.get("/v1/nope"), 404, "not_found")
    _assert_error(client.get("/v1/classify"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "exc, status, error",
    [
        (QueueFullError(512, retry_after_s=3), 429, "overloaded"),
        (RequestTimeoutError("no result within 10 s"), 504, "timeout"),
        (BatchFailedError("inference failed for a batch of 4: boom"), 500, "inference_failed"),
        (InvalidInputError("input must be float32 (1, 28, 28)"), 400, "invalid_input"),
    ],
)
def test_batcher_errors_map_to_http(client, make_png, exc, status, error):
    classifier = client.app.state.repository.lookup().classifier
    real, classifier.batcher = classifier.batcher, FailingBatcher(exc)
    try:
        r = client.post("/v1/classify", content=make_png(1), headers=PNG)
    finally:
        classifier.batcher = real
    _assert_error(r, status, error)
    if status == 429:
        assert r.headers["retry-after"] == "3"


def test_fastapi_validation_errors_use_the_same_body(tiny_model_path):
    app = create_app(_settings(tiny_model_path))

    async def echo(n: int) -> dict:
        return {"n": n}

    app.add_api_route("/echo", echo)
    with TestClient(app) as c:
        _assert_error(c.get("/echo?n=abc"), 422, "invalid_parameter", "query.n")
        _assert_error(c.get("/echo"), 422, "invalid_parameter", "query.n")
        assert c.get("/echo?n=3").json() == {"n": 3}


def test_real_server_fault_is_a_json_500(tiny_model_path):
    app = create_app(_settings(tiny_model_path))

    async def boom():
        raise RuntimeError("bug")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        _assert_error(c.get("/boom"), 500, "internal_error")


# --- metrics


def test_metrics_change_after_requests(client, make_png):
    labels = {"route": "/v1/classify", "method": "POST", "status": "200"}
    before_req = _sample("sepconv_http_requests_total", **labels)
    before_dur = _sample("sepconv_http_request_duration_seconds_count", **labels)
    model = {"model": "tiny-l", "version": "test"}
    before_img = _sample("sepconv_images_classified_total", **model)
    before_pre = _sample("sepconv_preprocess_duration_seconds_count", **model)
    before_inf = _sample("sepconv_inference_duration_seconds_count", **model)
    files = [("file", (f"{i}.png", make_png(i), "image/png")) for i in range(2)]
    assert client.post("/v1/classify", files=files).status_code == 200
    assert client.post("/v1/classify", content=make_png(5), headers=PNG).status_code == 200
    assert _sample("sepconv_http_requests_total", **labels) == before_req + 2
    assert _sample("sepconv_http_request_duration_seconds_count", **labels) == before_dur + 2
    # The engine's series name the model and version they are about.
    assert _sample("sepconv_images_classified_total", **model) == before_img + 3
    assert _sample("sepconv_preprocess_duration_seconds_count", **model) == before_pre + 3
    assert _sample("sepconv_inference_duration_seconds_count", **model) > before_inf
    text = client.get("/metrics").text
    assert (
        'sepconv_model_info{model="tiny-l",precision="fp32",provider="CPUExecutionProvider",'
        'version="test"} 1.0' in text
    )
    assert 'sepconv_model_loads_total{model="tiny-l",outcome="ok",version="test"}' in text
    for name in (
        "sepconv_http_requests_in_flight",
        "sepconv_batch_queue_wait_seconds_bucket",
        "sepconv_batch_size_bucket",
        "sepconv_batch_queue_depth",
    ):
        assert name in text


def test_route_label_is_the_template_not_the_raw_path(client):
    client.get("/v1/does-not-exist-12345")
    text = client.get("/metrics").text
    assert "does-not-exist-12345" not in text
    assert 'route="<unmatched>"' in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics_is_clean(client, make_png):
    client.post("/v1/classify", content=make_png(1), headers=PNG)
    client.get("/v1/nope")
    text = client.get("/metrics").text
    proc = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_openapi_documents_every_endpoint_with_examples(client):
    spec = client.get("/openapi.json").json()
    for path, method in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/models", "get"),
        ("/v1/classify", "post"),
    ]:
        op = spec["paths"][path][method]
        assert op["summary"] and op["description"]
    classify = spec["paths"]["/v1/classify"]["post"]
    [top_k] = [p for p in classify["parameters"] if p["name"] == "top_k"]
    assert top_k["schema"]["minimum"] == 1 and top_k["schema"]["default"] == 5
    assert {"multipart/form-data", "image/*"} <= set(classify["requestBody"]["content"])
    for status in ("200", "400", "413", "415", "422", "429", "503", "504"):
        assert "example" in classify["responses"][status]["content"]["application/json"]
