"""``sepconv-classify`` against a real server (HTTP and gRPC on free loopback ports): the three
protocols agree, folders, JSON Lines, a progress bar, failures, retries and usage errors."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import tomllib
from importlib import import_module
from pathlib import Path

import orjson
import pytest

from bench.server import free_port
from service.client import base, cli
from service.engine.batcher import QueueFullError

from .conftest import TINY_LABELS
from .waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("v1", "oip", "grpc")


class Served:
    """uvicorn (HTTP, and the app's gRPC server) on free loopback ports, in a thread."""

    def __init__(self, model_path: Path) -> None:
        import uvicorn

        from service.api.app import create_app
        from service.settings import Settings

        settings = Settings(
            model_path=model_path, provider="cpu", warmup_runs=0, grpc_port=free_port()
        )
        self.app = create_app(settings)
        self.http_port = free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.http_port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(self._started, "the server did not start")
        self.urls = {
            "v1": f"http://127.0.0.1:{self.http_port}",
            "oip": f"http://127.0.0.1:{self.http_port}",
            "grpc": f"grpc://127.0.0.1:{settings.grpc_port}",
        }

    def _started(self) -> bool:
        if not self.thread.is_alive():
            raise RuntimeError("the server stopped during start-up")
        return self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_model_path):
    server = Served(tiny_model_path)
    yield server
    server.stop()


@pytest.fixture
def run(served, capsys):
    """``run(protocol, *args)`` -> (exit status, stdout, stderr) of the client, in-process."""

    def _run(protocol: str, *args: str) -> tuple[int, str, str]:
        status = cli.main([*args, "--protocol", protocol, "--url", served.urls[protocol]])
        out, err = capsys.readouterr()
        return status, out, err

    return _run


@pytest.fixture
def images(tmp_path, make_png) -> Path:
    """A folder of five PNGs (two in a subfolder), plus files the client must skip."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for i, name in enumerate(["b.png", "a.png", "c.jpg", "sub/d.png", "sub/e.PNG"]):
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        (folder / name).write_bytes(make_png(seed=i, fmt=fmt))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden" / "x.png").write_bytes(make_png(seed=9))
    return folder


def json_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines()]


def test_every_protocol_gives_the_same_answer(run, tmp_path, make_png):
    image = tmp_path / "one.png"
    image.write_bytes(make_png(seed=3))
    answers = {}
    for protocol in PROTOCOLS:
        status, out, err = run(protocol, str(image), "--json", "-k", "3")
        assert status == 0, err
        (record,) = json_lines(out)
        assert record["file"] == str(image)
        assert record["model"] == {"name": "tiny-l", "version": "test"}
        answers[protocol] = record["predictions"]
        assert err == ""  # one image: no progress bar, no summary
    reference = answers["v1"]
    assert sorted(p["label"] for p in reference) == sorted(TINY_LABELS)
    probabilities = [p["probability"] for p in reference]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    for protocol in ("oip", "grpc"):
        got = answers[protocol]
        assert [(p["label"], p["index"]) for p in got] == [
            (p["label"], p["index"]) for p in reference
        ]
        # OIP's classification strings carry six decimals.
        assert [p["probability"] for p in got] == pytest.approx(probabilities, abs=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_top_k_and_human_output(run, tmp_path, make_png, protocol):
    image = tmp_path / "shoe.png"
    image.write_bytes(make_png(seed=1))
    status, out, err = run(protocol, str(image), "-k", "2")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == str(image)
    assert len(lines) == 3  # the file, then one line per label
    for line in lines[1:]:
        probability, label, _ = line.split(maxsplit=2)
        assert 0.0 <= float(probability) <= 1.0 and label in TINY_LABELS
    status, out, _ = run(protocol, str(image), "--top-k", "1", "--json")
    assert status == 0 and len(json_lines(out)[0]["predictions"]) == 1


def test_folder_with_progress_bar_and_json_lines(run, images):
    status, out, err = run("v1", str(images), "--json", "--concurrency", "3")
    assert status == 0, err
    records = json_lines(out)
    # Recursively, sorted, image extensions only, hidden folders skipped.
    expected = ["a.png", "b.png", "c.jpg", "sub/d.png", "sub/e.PNG"]
    assert [r["file"] for r in records] == [str(images / name) for name in expected]
    assert all(len(r["predictions"]) == 3 for r in records)  # top 5 clamped to 3 classes
    assert "classifying" in err and "5/5" in err  # tqdm's bar, on stderr only
    assert "classified 5 of 5 images with tiny-l version test" in err
    status, _, err = run("grpc", str(images), "--no-progress")
    assert status == 0 and "classifying" not in err


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_corrupt_image_fails_alone(run, images, protocol):
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n definitely not a PNG")
    status, out, err = run(protocol, str(images), "--json", "--no-progress")
    assert status == 1
    records = {Path(r["file"]).name: r for r in json_lines(out)}
    assert len(records) == 6
    error = records.pop("bad.png")["error"]
    assert "cannot decode image" in error["message"]
    assert error["status"] == {"grpc": "INVALID_ARGUMENT"}.get(protocol, 400)
    # /v1 and gRPC carry the stable code; OIP REST's error body has only the sentence.
    assert error["code"] == (None if protocol == "oip" else "invalid_image")
    assert all("predictions" in r for r in records.values())
    assert "classified 5 of 6 images" in err and "1 failed" in err

    status, out, err = run(protocol, str(images / "bad.png"), str(images / "a.png"))
    assert status == 1
    assert out.splitlines()[0] == str(images / "a.png")
    assert f"{images / 'bad.png'}: error:" in err and "cannot decode image" in err


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_down_is_one_clear_line(tmp_path, make_png, capsys, protocol):
    image = tmp_path / "one.png"
    image.write_bytes(make_png())
    port = free_port()  # nothing listens there
    url = f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"
    status = cli.main([str(image), "--protocol", protocol, "--url", url, "--timeout", "5"])
    out, err = capsys.readouterr()
    assert status == cli.UNREACHABLE
    assert out == ""
    assert len(err.splitlines()) == 1 and "cannot reach" in err and str(port) in err


def test_python_dash_m_and_no_traceback(tmp_path, make_png):
    image = tmp_path / "one.png"
    image.write_bytes(make_png())
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "service.client", str(image), "--url", url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == cli.UNREACHABLE
    assert "Traceback" not in done.stderr and "cannot reach" in done.stderr


class FlakyBatcher:
    """The real batcher, refusing the first ``failures`` images as a full queue would."""

    def __init__(self, real, failures: int, retry_after_s: int) -> None:
        self.real, self.failures, self.retry_after_s = real, failures, retry_after_s

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _refuse(self) -> bool:
        self.failures -= 1
        return self.failures >= 0

    def enqueue(self, x, ctx=None, *, alone=False):
        if self._refuse():
            raise QueueFullError(512, self.retry_after_s)
        return self.real.enqueue(x, ctx, alone=alone)

    async def submit(self, x, ctx=None, *, alone=False):
        if self._refuse():
            raise QueueFullError(512, self.retry_after_s)
        return await self.real.submit(x, ctx, alone=alone)


@contextlib.contextmanager
def flaky(served, failures: int, retry_after_s: int):
    classifier = served.app.state.repository.lookup().classifier
    real = classifier.batcher
    classifier.batcher = FlakyBatcher(real, failures, retry_after_s)
    try:
        yield
    finally:
        classifier.batcher = real


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_overload_is_retried_after_the_delay_the_server_asks(
    run, served, tmp_path, make_png, monkeypatch, protocol
):
    image = tmp_path / "one.png"
    image.write_bytes(make_png())
    waits: list[float] = []
    monkeypatch.setattr(base, "sleep", waits.append)
    with flaky(served, failures=2, retry_after_s=7):
        status, out, err = run(protocol, str(image), "--json")
    assert status == 0, err
    assert waits == [7, 7]  # Retry-After (HTTP) or grpc-retry-pushback-ms, obeyed
    assert json_lines(out)[0]["predictions"]

    waits.clear()
    with flaky(served, failures=5, retry_after_s=2):
        status, out, err = run(protocol, str(image), "--retries", "1")
    assert status == 1 and waits == [2]
    assert "the batch queue is full" in err
    assert ("RESOURCE_EXHAUSTED overloaded" if protocol == "grpc" else "429") in err


@pytest.mark.parametrize("protocol", ["oip", "grpc"])
def test_unknown_model_stops_the_run_once(run, images, protocol):
    status, out, err = run(protocol, str(images), "--model", "nope")
    assert status == 1 and out == ""
    assert err.count("unknown model 'nope'") == 1, err


def test_model_name_is_discovered(served):
    from service.client.grpc_oip import GrpcTransport
    from service.client.rest import OIPTransport

    options = dict(timeout_s=5, top_k=1, model=None, version=None)
    oip_rest = OIPTransport(served.urls["oip"], concurrency=1, **options)
    grpc = GrpcTransport(served.urls["grpc"].removeprefix("grpc://"), **options)
    for transport in (oip_rest, grpc):
        transport.resolve_model()
        assert transport.model == "tiny-l"
        transport.close()


def test_only_ready_model():
    assert base.only_ready_model([("a", "READY"), ("a", "READY"), ("b", "UNAVAILABLE")]) == "a"
    with pytest.raises(base.Fatal, match="serves 2 models .* --model"):
        base.only_ready_model([("a", "READY"), ("b", "READY")])
    with pytest.raises(base.Fatal, match="no READY model"):
        base.only_ready_model([])


@pytest.mark.parametrize(
    "args, message",
    [
        (["{empty}"], "no image files found"),
        (["{missing}"], "no such file or folder"),
        (["{image}", "--protocol", "v1", "--url", "grpc://h:1"], "go with --protocol grpc"),
        (["{image}", "--protocol", "grpc", "--url", "http://h:1"], "host:port or grpc://"),
        (["{image}", "--url", "ftp://h"], "takes an http(s)://host:port URL"),
        (["{image}", "-k", "0"], "must be > 0"),
        (["{image}", "--retries", "-1"], "--retries must be >= 0"),
    ],
)
def test_usage_errors_exit_2(tmp_path, make_png, capsys, args, message):
    (tmp_path / "empty").mkdir()
    image = tmp_path / "x.png"
    image.write_bytes(make_png())
    names = {"empty": tmp_path / "empty", "missing": tmp_path / "nope.png", "image": image}
    with pytest.raises(SystemExit) as info:
        cli.main([a.format(**names) for a in args])
    assert info.value.code == cli.USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "url, protocol, expected",
    [
        (None, None, ("v1", "http://127.0.0.1:8000")),
        ("localhost:9000/", "oip", ("oip", "http://localhost:9000")),
        ("https://h/prefix", None, ("v1", "https://h/prefix")),
        (None, "grpc", ("grpc", "127.0.0.1:8001")),
        ("grpc://h", None, ("grpc", "h:8001")),
        ("h:9001", "grpc", ("grpc", "h:9001")),
        ("[::1]:9001", "grpc", ("grpc", "[::1]:9001")),
    ],
)
def test_endpoint_convention(url, protocol, expected):
    assert cli.endpoint(url, protocol) == expected


def test_the_client_installs_light():
    code = (
        "import sys, service.client.cli, service.client.rest, service.client.grpc_oip\n"
        "names = ('onnxruntime', 'fastapi', 'starlette', 'uvicorn', 'prometheus_client',\n"
        "         'service.engine.batcher', 'service.engine.classifier', 'service.settings')\n"
        "bad = sorted(m for m in names if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_entry_point_is_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["sepconv-classify"].partition(":")
    assert getattr(import_module(module), name) is cli.main
