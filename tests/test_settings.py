"""Settings validation and the ``python -m service`` entry point's fail-fast start-up."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, available_cores

from .waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_env_prefix_and_types(monkeypatch):
    monkeypatch.setenv("SEPCONV_MODEL_PATH", "/models/x.onnx")
    monkeypatch.setenv("SEPCONV_PORT", "9001")
    monkeypatch.setenv("SEPCONV_PROVIDER", "cpu")
    monkeypatch.setenv("SEPCONV_MAX_WAIT_MS", "0.5")
    s = Settings()
    assert s.model_path == Path("/models/x.onnx")
    assert (s.port, s.provider, s.max_wait_ms) == (9001, "cpu", 0.5)
    assert s.host == "127.0.0.1" and s.max_body_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize(
    "env, value, field",
    [
        ("SEPCONV_PROVIDER", "tpu", "provider"),
        ("SEPCONV_PORT", "70000", "port"),
        ("SEPCONV_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("SEPCONV_MAX_BODY_BYTES", "lots", "max_body_bytes"),
    ],
)
def test_bad_values_fail_naming_the_field(monkeypatch, env, value, field):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=field):
        Settings()


def test_queue_must_hold_a_full_batch():
    with pytest.raises(ValidationError, match="max_queue_size"):
        Settings(max_batch_size=64, max_queue_size=8)


def test_thread_defaults_do_not_oversubscribe_cores():
    cores = available_cores()
    assert Settings(workers=1).resolved_intra_op_threads == cores
    assert Settings(workers=cores).resolved_intra_op_threads == 1
    assert Settings(workers=cores * 4).resolved_intra_op_threads == 1
    assert Settings(intra_op_threads=3).resolved_intra_op_threads == 3


def _serve(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEPCONV_")}
    full_env |= {"SEPCONV_PORT": "8799", **env}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, time.perf_counter() - start


def test_missing_model_exits_nonzero_with_a_clear_message(tmp_path):
    proc, elapsed = _serve(tmp_path, SEPCONV_MODEL_PATH=str(tmp_path / "nope.onnx"))
    assert proc.returncode == 1
    assert "nope.onnx does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 20  # fails before uvicorn or onnxruntime start, not after a timeout


def test_corrupt_model_exits_nonzero_with_a_clear_message(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf\xff\xfe" * 10)
    proc, _ = _serve(tmp_path, SEPCONV_MODEL_PATH=str(bad))
    assert proc.returncode == 1
    assert "is not a readable ONNX model" in proc.stderr


def test_invalid_setting_exits_with_usage_status(tmp_path):
    proc, _ = _serve(tmp_path, SEPCONV_WORKERS="zero")
    assert proc.returncode == 2
    assert "workers" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None, ctype: str = "") -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.mark.slow
def test_two_workers_serve_and_aggregate_metrics(tmp_path, tiny_model_path, make_png):
    """`python -m service` for real: two uvicorn workers, metrics summed over both."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEPCONV_", "PROMETHEUS_"))}
    env |= {
        "SEPCONV_MODEL_PATH": str(tiny_model_path),
        "SEPCONV_PORT": str(port),
        "SEPCONV_WORKERS": "2",
        "SEPCONV_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path, env=env)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, "server exited during start-up"
        return _get(base + "/readyz")[0] == 200

    try:
        wait_until(ready, "server not ready", timeout_s=60, interval_s=0.2)
        n = 12  # new connections each time, so both workers get some
        for i in range(n):
            status, _ = _get(base + "/v1/classify", make_png(i), "image/png")
            assert status == 200
        counted: list[float] = []

        def scraped() -> str | None:
            # A request is counted once its response is sent, a moment after the client has it:
            # scrape until the last one is in (or the wait fails on the count that was seen).
            status, body = _get(base + "/metrics")
            assert status == 200
            text = body.decode()
            line = next(
                ln
                for ln in text.splitlines()
                if ln.startswith("sepconv_http_requests_total{")
                and 'route="/v1/classify"' in ln
                and 'status="200"' in ln
            )
            counted.append(float(line.rsplit(" ", 1)[1]))
            return text if counted[-1] >= n else None

        text = wait_until(scraped, lambda: f"classify requests counted: {counted[-1]} of {n}")
        assert counted[-1] == n
        assert "sepconv_model_info{" in text
        if shutil.which("promtool"):
            lint = subprocess.run(
                ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def documented_settings() -> dict[str, str]:
    """The settings table of docs/serving.md ("## Settings"): name -> default as written."""
    guide = (ROOT / "docs" / "serving.md").read_text()
    section = guide.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `SEPCONV_([A-Z0-9_]+)` \| ([^|]*) \|", section, re.M)
    assert len(rows) == len({name for name, _ in rows}), "a setting is listed twice"
    return {name.lower(): default.strip() for name, default in rows}


def test_serving_guide_documents_every_setting_with_its_default():
    documented = documented_settings()
    assert set(documented) == set(Settings.model_fields), (
        f"missing: {sorted(set(Settings.model_fields) - set(documented))}, "
        f"not settings: {sorted(set(documented) - set(Settings.model_fields))}"
    )
    for name, field in Settings.model_fields.items():
        shown, default = documented[name], field.default
        if default is None:
            assert shown == "unset", name
            continue
        assert shown.startswith("`") and shown.endswith("`"), (name, shown)
        value = shown.strip("`")
        if isinstance(default, bool):
            assert value == str(default).lower(), name
        elif isinstance(default, int | float):
            assert float(value) == default, name
        else:
            assert value == str(default), name


def test_auto_workers_one_per_core_up_to_the_cap():
    from service.settings import MAX_AUTO_WORKERS

    auto = Settings()
    assert auto.workers == "auto"
    assert auto.resolved_workers == min(available_cores(), MAX_AUTO_WORKERS)
    assert auto.resolved_workers * auto.resolved_intra_op_threads <= available_cores()
    assert Settings(workers=3).resolved_workers == 3
    with pytest.raises(ValidationError, match="workers"):
        Settings(workers=0)
    with pytest.raises(ValidationError, match="workers"):
        Settings(workers="many")


def test_cgroup_quota_caps_the_cores(tmp_path):
    from sepconv.hardware import cgroup_cpu_limit

    v2 = tmp_path / "cpu.max"
    quota, period = tmp_path / "quota", tmp_path / "period"
    missing = tmp_path / "absent"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2, missing, missing) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, missing, missing) is None
    quota.write_text("200000\n")
    period.write_text("100000\n")
    assert cgroup_cpu_limit(missing, quota, period) == 2.0
    quota.write_text("-1\n")
    assert cgroup_cpu_limit(missing, quota, period) is None
    assert cgroup_cpu_limit(missing, missing, missing) is None
