"""The inference routes' fast path (service/api/fastpath.py): the same answers as FastAPI's
stack, byte for byte, and refusals answered before anything is parsed."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from starlette.requests import Request

from service.api.app import create_app
from service.api.fastpath import FastPath
from service.api.middleware import ServiceMiddleware
from service.engine.batcher import QueueFullError
from service.metrics import REFUSAL_HOLD
from service.protocols import oip
from service.settings import Settings

from .conftest import FailingBatcher

PNG = {"content-type": "image/png"}
#: Headers that differ between any two responses, whichever path answers.
VOLATILE = {"x-request-id", "date"}


@pytest.fixture(scope="module")
def served(tiny_model_path):
    """The app under TestClient (lifespan run), and the same app's FastAPI stack alone, with
    the service middleware around it: the path every request took before the fast path."""
    settings = Settings(model_path=tiny_model_path, warmup_runs=0, grpc_port=0)
    app = create_app(settings)

    stack = FastAPI.build_middleware_stack(app)

    async def framework_only(scope, receive, send):
        scope["app"] = app  # what Starlette's own __call__ sets
        await stack(scope, receive, send)

    framework = ServiceMiddleware(
        framework_only, drain=app.state.drain, max_body_bytes=settings.max_body_bytes
    )
    with TestClient(app) as client:
        yield client, framework


def _framework(served, method: str, url: str, **kwargs) -> httpx.Response:
    """The answer of FastAPI's stack alone (the app's lifespan and state, no fast path)."""
    client, framework = served

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=framework)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.request(method, url, **kwargs)

    return client.portal.call(call)


def _both(served, method: str, url: str, **kwargs) -> tuple[httpx.Response, httpx.Response]:
    return served[0].request(method, url, **kwargs), _framework(served, method, url, **kwargs)


def _same(fast: httpx.Response, slow: httpx.Response) -> None:
    assert fast.status_code == slow.status_code
    assert fast.content == slow.content
    assert {k: v for k, v in fast.headers.items() if k not in VOLATILE} == {
        k: v for k, v in slow.headers.items() if k not in VOLATILE
    }
    assert "x-request-id" in fast.headers


def _oip_image_request(blob: bytes, **extra) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": oip.IMAGE_INPUT,
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(oip.serialize_bytes([blob]))},
                }
            ],
            "outputs": [{"name": oip.OUTPUT_NAME, "parameters": {"binary_data": True}}],
            **extra,
        }
    )
    headers = {
        "content-type": oip.BINARY_CONTENT_TYPE,
        oip.HEADER_LENGTH: str(len(header)),
    }
    return header + oip.serialize_bytes([blob]), headers


@pytest.mark.parametrize(
    "case",
    [
        "v1 raw",
        "v1 multipart",
        "v1 top_k",
        "v1 bad image",
        "v1 bad top_k",
        "v1 unsupported type",
        "v1 unknown model",
        "v1 unknown version",
        "oip binary",
        "oip json tensor",
        "oip versioned",
        "oip bad json",
        "oip unknown model",
        "body too large",
    ],
)
def test_the_fast_path_answers_what_fastapi_answers(served, make_png, case):
    blob = make_png(3)
    body, headers = _oip_image_request(blob, id="req-7")
    requests = {
        "v1 raw": ("/v1/classify", {"content": blob, "headers": PNG}),
        "v1 multipart": (
            "/v1/classify",
            {"files": [("file", (f"{i}.png", make_png(i), "image/png")) for i in range(2)]},
        ),
        "v1 top_k": (
            "/v1/classify?top_k=2&model=tiny-l&version=test",
            {"content": blob, "headers": PNG},
        ),
        "v1 bad image": ("/v1/classify", {"content": b"\x89PNG broken", "headers": PNG}),
        "v1 bad top_k": ("/v1/classify?top_k=0", {"content": blob, "headers": PNG}),
        "v1 unsupported type": (
            "/v1/classify",
            {"content": b"x", "headers": {"content-type": "text/plain"}},
        ),
        "v1 unknown model": ("/v1/classify?model=nope", {"content": blob, "headers": PNG}),
        "v1 unknown version": ("/v1/classify?version=9", {"content": blob, "headers": PNG}),
        "oip binary": ("/v2/models/tiny-l/infer", {"content": body, "headers": headers}),
        "oip json tensor": (
            "/v2/models/tiny-l/infer",
            {
                "json": {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "FP32",
                            "shape": [1, 1, 28, 28],
                            "data": [0.5] * 784,
                        }
                    ]
                }
            },
        ),
        "oip versioned": (
            "/v2/models/tiny-l/versions/test/infer",
            {"content": body, "headers": headers},
        ),
        "oip bad json": (
            "/v2/models/tiny-l/infer",
            {"content": b"{", "headers": {"content-type": "application/json"}},
        ),
        "oip unknown model": ("/v2/models/nope/infer", {"content": body, "headers": headers}),
        "body too large": (
            "/v1/classify",
            {"content": b"x" * (Settings().max_body_bytes + 1), "headers": PNG},
        ),
    }
    url, kwargs = requests[case]
    _same(*_both(served, "POST", url, **kwargs))


def test_errors_from_the_engine_map_the_same(served, make_png):
    client, _ = served
    classifier = client.app.state.repository.lookup().classifier
    real, classifier.batcher = classifier.batcher, FailingBatcher(QueueFullError(512, 3))
    try:
        fast, slow = _both(served, "POST", "/v1/classify", content=make_png(1), headers=PNG)
    finally:
        classifier.batcher = real
    _same(fast, slow)
    assert fast.status_code == 429 and fast.headers["retry-after"] == "3"


def test_only_post_to_the_inference_routes_takes_the_fast_path(tiny_model_path):
    seen = []

    async def inner(scope, receive, send):
        seen.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = create_app(Settings(model_path=tiny_model_path, warmup_runs=0, grpc_port=0))
    fast = FastPath(inner, app)
    assert len(fast.routes) == 3  # /v1/classify and both OIP infer routes

    async def call(method: str, path: str) -> int:
        messages = []
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [],
        }

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            messages.append(message)

        await fast(scope, receive, send)
        return messages[0]["status"]

    # Not started: the repository answers 503 on the fast path, never reaching FastAPI.
    assert asyncio.run(call("POST", "/v1/classify")) == 503
    assert asyncio.run(call("POST", "/v2/models/m/versions/2/infer")) == 503
    for method, path in [
        ("GET", "/v1/classify"),
        ("POST", "/v1/classify/extra"),
        ("POST", "/v2/models/m/ready"),
        ("GET", "/v2/models/m/infer"),
        ("POST", "/v2/models/a/b/infer"),
    ]:
        assert asyncio.run(call(method, path)) == 204
    assert len(seen) == 5


def _overload(client) -> None:
    classifier = client.app.state.repository.lookup().classifier
    classifier.batcher.image_seconds = 0.01
    classifier.admission.reserved = 200  # 2 s of work queued, over the 1 s budget


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("protocol", ["v1", "oip"])
def test_a_refusal_is_answered_before_the_request_is_parsed(
    served, make_png, monkeypatch, protocol
):
    client, _ = served
    classifier = client.app.state.repository.lookup().classifier
    if protocol == "v1":
        url, kwargs = "/v1/classify", {"content": make_png(1), "headers": PNG}
        route = "/v1/classify"
    else:
        body, headers = _oip_image_request(make_png(1))
        url, kwargs = "/v2/models/tiny-l/infer", {"content": body, "headers": headers}
        route = "/v2/models/{model_name}/infer"
    http_labels = {"route": route, "method": "POST", "status": "429"}
    refused = {"model": "tiny-l", "version": "test", "reason": "over_budget"}
    http_before = _sample("sepconv_http_requests_total", **http_labels)
    refused_before = _sample("sepconv_batch_rejected_total", **refused)
    reached = []
    _overload(client)
    try:
        with monkeypatch.context() as m:
            # No endpoint call at all: no Request parsing, no body read, no decoding.
            for hot in FastPath(None, client.app).routes:
                m.setattr(hot[0], "endpoint", lambda *a, **k: reached.append(a))
            m.setattr(Request, "body", lambda *_: reached.append("body"))
            fast = client.post(url, **kwargs)
        slow = _framework(served, "POST", url, **kwargs)
    finally:
        classifier.admission.reserved = 0
    assert reached == []
    assert fast.status_code == slow.status_code == 429
    assert fast.content == slow.content  # the protocol's own error body, as before
    if protocol == "v1":
        assert fast.json()["error"] == "overloaded" and "budget" in fast.json()["detail"]
    else:
        assert set(fast.json()) == {"error"} and "budget" in fast.json()["error"]
    assert fast.headers["retry-after"] == slow.headers["retry-after"] == "2"
    assert fast.headers["content-type"] == "application/json"
    assert fast.headers["x-request-id"]
    # Counted like any refusal: by route template and status, and as refused images.
    assert _sample("sepconv_http_requests_total", **http_labels) == http_before + 2
    assert _sample("sepconv_batch_rejected_total", **refused) == refused_before + 2


def test_early_refusals_are_paced(served, make_png):
    """Past the paced rate the early refusal waits its turn too (the repository paces it)."""
    client, _ = served
    classifier = client.app.state.repository.lookup().classifier
    admission = classifier.admission
    factor, nominal = admission.refusal_rate_factor, classifier.batcher.nominal_image_seconds
    admission.refusal_rate_factor = 1
    classifier.batcher.nominal_image_seconds = 0.1  # 10 refusals/s
    hold = REFUSAL_HOLD.labels(classifier.spec.name, classifier.spec.version)
    held_before = hold._sum.get()
    _overload(client)
    try:
        answers = [client.post("/v1/classify", content=make_png(i), headers=PNG) for i in (1, 2)]
    finally:
        admission.reserved = 0
        admission.refusal_rate_factor = factor
        classifier.batcher.nominal_image_seconds = nominal
    assert [r.status_code for r in answers] == [429, 429]
    assert hold._sum.get() > held_before
    assert client.post("/v1/classify", content=make_png(3), headers=PNG).status_code == 200


def test_draining_closes_fast_path_connections(served, make_png):
    client, _ = served
    drain = client.app.state.drain
    started, drain.started_at = drain.started_at, 1.0
    try:
        r = client.post("/v1/classify", content=make_png(1), headers=PNG)
    finally:
        drain.started_at = started
    assert r.status_code == 200 and r.headers["connection"] == "close"
    assert "connection" not in client.post("/v1/classify", content=make_png(1), headers=PNG).headers
