"""The drain on SIGTERM (service/drain.py): readiness 503 while everything is still served, with
``Connection: close``, then the graceful shutdown. In-process for the app's side, and real
``python -m service`` processes (one worker and two) for the signal handling."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time

import pytest
from fastapi.testclient import TestClient

from bench.server import ServerProcess
from service.api.app import create_app
from service.drain import Drain
from service.settings import Settings


@pytest.fixture
def app_and_drain(tiny_model_path):
    drain = Drain()
    settings = Settings(model_path=tiny_model_path, provider="cpu", warmup_runs=0)
    with TestClient(create_app(settings, drain=drain)) as client:
        yield client, drain


def test_draining_app_is_not_ready_but_serves_everything(app_and_drain, make_png):
    client, drain = app_and_drain
    assert client.get("/readyz").status_code == 200
    ok = client.post("/v1/classify", content=make_png(1), headers={"Content-Type": "image/png"})
    assert ok.status_code == 200 and ok.headers.get("connection") != "close"

    drain.begin()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
    assert ready.headers["connection"] == "close" and ready.headers["retry-after"] == "1"
    assert client.get("/v2/health/ready").status_code == 503
    served = client.post("/v1/classify", content=make_png(1), headers={"Content-Type": "image/png"})
    assert served.status_code == 200 and served.json() == ok.json()
    assert served.headers["connection"] == "close"
    assert client.get("/healthz").status_code == 200
    name = served.json()["model"]["name"]
    assert client.get(f"/v2/models/{name}/ready").status_code == 200
    assert client.get("/metrics").headers["connection"] == "close"


def _request(port: int, method: str, path: str, body: bytes | None = None):
    """One request on a new connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Content-Type": "image/png"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_then_stops(tmp_path, tiny_model_path, make_png, workers):
    env = {
        "SEPCONV_WORKERS": str(workers),
        "SEPCONV_DRAIN_DELAY_S": "4",
        "SEPCONV_GRACEFUL_SHUTDOWN_S": "2",
        "SEPCONV_LOG_LEVEL": "info",
    }
    with ServerProcess(tiny_model_path, env, tmp_path / "server.log", ready_timeout_s=60) as srv:
        port, proc = srv.port, srv.proc
        # A kept-alive connection opened before the signal.
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        kept.request("GET", "/healthz")
        first = kept.getresponse()
        first.read()
        assert first.status == 200 and first.getheader("connection") != "close"

        proc.send_signal(signal.SIGTERM)
        # Readiness flips at once (the supervisor forwards SIGTERM to every worker; new
        # connections are spread over them by the kernel, so several are asked).
        deadline = time.monotonic() + 2
        statuses: list[int] = []
        while time.monotonic() < deadline:
            statuses = [_request(port, "GET", "/readyz")[0] for _ in range(4 * workers)]
            if set(statuses) == {503}:
                break
        assert set(statuses) == {503}, statuses

        # Still accepting and serving inside the delay, every answer closing its connection.
        status, headers, body = _request(port, "POST", "/v1/classify", make_png(3))
        assert status == 200 and json.loads(body)["results"][0]["predictions"]
        assert headers["connection"] == "close"
        kept.request("GET", "/v1/models")
        resp = kept.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("connection") == "close"
        kept.close()

        try:
            code = proc.wait(4 + 2 + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after the drain and grace:\n{srv.log_tail()}")
        # uvicorn re-raises SIGTERM after its shutdown (-15); the supervisor returns 0.
        assert code in (0, -signal.SIGTERM), srv.log_tail()
        log = srv.log_tail(200)
        assert log.count("SIGTERM: draining for 4.0 s") == workers
        assert log.count("Application shutdown complete") == workers


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_skips_the_drain_delay(tmp_path, tiny_model_path, workers):
    env = {
        "SEPCONV_WORKERS": str(workers),
        "SEPCONV_DRAIN_DELAY_S": "60",
        "SEPCONV_LOG_LEVEL": "info",
    }
    with ServerProcess(tiny_model_path, env, tmp_path / "server.log", ready_timeout_s=60) as srv:
        # Ctrl-C: SIGINT to the terminal's process group, the supervisor and its workers alike.
        os.killpg(srv.proc.pid, signal.SIGINT)
        try:
            srv.proc.wait(20)  # far less than the 60 s delay
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGINT waited for the drain delay:\n{srv.log_tail()}")
        assert "draining" not in srv.log_tail(200)
