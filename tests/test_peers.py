"""The peer servers of ``python -m bench.peers`` and its comparison table.

Nothing here creates the KServe venv or reaches the network; the one KServe test runs only
where ``python -m bench.peers`` already created the venv.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.models import BenchModel
from bench.peers import contenders, results, venvs
from bench.peers.__main__ import median_raw, parse_args, reference_probs
from bench.peers.plain_fastapi import create_app
from sepconv.spec import read_spec
from tests.conftest import TINY_LABELS


@pytest.fixture(scope="module")
def tiny(tiny_model_path) -> BenchModel:
    return BenchModel("tiny", "tiny", tiny_model_path, read_spec(tiny_model_path), False)


@pytest.fixture(scope="module")
def plain(tiny_model_path):
    with TestClient(create_app(str(tiny_model_path))) as client:
        yield client


# --- the plain FastAPI peer -------------------------------------------------------------------


def test_plain_fastapi_classifies_like_the_model(plain, tiny, make_png):
    image = make_png(seed=3)
    response = plain.post("/v1/classify", content=image, headers={"content-type": "image/png"})
    assert response.status_code == 200
    doc = response.json()
    assert doc["model"] == {"name": tiny.spec.name, "version": "test"}
    predictions = doc["results"][0]["predictions"]
    assert len(predictions) == len(TINY_LABELS)  # top 5 of 3 classes
    reference = reference_probs(tiny, image)
    for p in predictions:
        assert p["label"] == TINY_LABELS[p["index"]]
        assert p["probability"] == pytest.approx(float(reference[p["index"]]), abs=1e-5)
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    # The bench's own answer check accepts it.
    contenders.check_answer("v1", response.content, reference)


def test_plain_fastapi_top_k_and_bad_input(plain, make_png):
    two = plain.post("/v1/classify?top_k=2", content=make_png(seed=1))
    assert two.status_code == 200
    assert len(two.json()["results"][0]["predictions"]) == 2
    assert plain.post("/v1/classify?top_k=0", content=make_png(seed=1)).status_code == 422
    bad = plain.post("/v1/classify", content=b"not an image")
    assert bad.status_code == 400
    assert "cannot identify image format" in bad.json()["detail"]
    assert plain.post("/v1/classify", content=b"").status_code == 400


def test_plain_fastapi_needs_a_model_path(monkeypatch):
    monkeypatch.delenv("PEER_MODEL_PATH", raising=False)
    with pytest.raises(RuntimeError, match="PEER_MODEL_PATH"):
        create_app()


def test_plain_fastapi_as_a_subprocess_on_a_free_port(tiny, tmp_path):
    """What the bench does: uvicorn in a child, readiness, then the first answer checked."""
    requests = contenders.requests_for("v1", tiny, count=2)
    with contenders.start("fastapi", tiny, tmp_path / "fastapi.log") as server:
        assert server.proc is not None and server.port > 0
        answer = contenders.post(server.base_url, requests, requests.bodies[1])
    assert server.proc is None  # stopped
    contenders.check_answer("v1", answer, reference_probs(tiny, requests.bodies[1]))


# --- requests and answer checks ---------------------------------------------------------------


def test_oip_json_request_carries_the_image_in_base64(tiny):
    requests = contenders.requests_for("oip-json", tiny, count=3)
    assert requests.path == f"/v2/models/{tiny.spec.name}/infer"
    assert requests.content_type == "application/json"
    raw = contenders.requests_for("v1", tiny, count=3)
    doc = json.loads(requests.bodies[2])
    (item,) = doc["inputs"]
    assert (item["name"], item["datatype"], item["shape"]) == ("image", "BYTES", [1])
    assert base64.b64decode(item["data"][0]) == raw.bodies[2]
    assert doc["outputs"] == [{"name": "probabilities", "parameters": {"classification": 5}}]
    with pytest.raises(ValueError, match="unknown protocol"):
        contenders.requests_for("grpc", tiny)


def test_check_answer_compares_by_probability_not_index():
    reference = np.array([0.2, 0.4, 0.4 - 5e-6], dtype=np.float32)

    def oip(index, score):
        return json.dumps({"outputs": [{"data": [f"{score:f}:{index}:x"]}]}).encode()

    contenders.check_answer("oip-json", oip(1, 0.4), reference)
    contenders.check_answer("oip-json", oip(2, 0.399995), reference)  # a near tie either way
    with pytest.raises(ValueError, match="best class 0"):
        contenders.check_answer("oip-json", oip(0, 0.2), reference)
    with pytest.raises(ValueError, match="model gives it"):
        contenders.check_answer("oip-json", oip(1, 0.9), reference)
    with pytest.raises(ValueError, match="out of range"):
        contenders.check_answer("oip-json", oip(7, 0.4), reference)
    with pytest.raises(ValueError, match="unreadable"):
        contenders.check_answer("v1", b'{"error": "bad"}', reference)


def test_child_env_drops_sepconv_settings(monkeypatch):
    monkeypatch.setenv("SEPCONV_WORKERS", "4")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = contenders.child_env({"PEER_MODEL_PATH": "m.onnx"})
    assert "SEPCONV_WORKERS" not in env
    assert env["PYTHONPATH"].split(":") == [str(contenders.REPO_ROOT), "/elsewhere"]
    assert env["PEER_MODEL_PATH"] == "m.onnx"


def test_parse_args_servers():
    assert parse_args([]).servers == ["sepconv", "fastapi", "kserve", "raw"]
    assert parse_args(["--servers", "fastapi,sepconv"]).servers == ["fastapi", "sepconv"]
    with pytest.raises(SystemExit):
        parse_args(["--servers", "triton"])
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


# --- the table and its ratios, on made-up numbers -----------------------------------------------


def _point(c, rate, p50, errors=0):
    return {"concurrency": c, "req_per_s": rate, "p50_ms": p50, "p99_ms": p50 * 3, "errors": errors}


def _run(server, protocol, c1_p50, c32_rate, round_=0):
    points = [_point(1, 1000 / c1_p50, c1_p50), _point(32, c32_rate, 20.0)]
    return {"server": server, "protocol": protocol, "round": round_, "points": points}


RAW = [
    {"batch": 1, "sessions": 1, "intra_op_threads": 2, "images_per_s": 900.0,
     "batch_latency_ms_p50": 1.0},
    {"batch": 8, "sessions": 1, "intra_op_threads": 2, "images_per_s": 1000.0,
     "batch_latency_ms_p50": 8.0},
]  # fmt: skip


def test_aggregate_takes_the_median_over_rounds():
    runs = [
        _run("sepconv", "v1", 1.0, 900.0, 0),
        _run("sepconv", "v1", 3.0, 1500.0, 1),
        _run("sepconv", "v1", 2.0, 1000.0, 2),
    ]
    runs[1]["points"][1].update(errors=4, error_kinds={"http_429": 3, "timeout": 1})
    stats = results.aggregate(runs)["sepconv/v1"]
    assert stats[1]["p50_ms"] == 2.0 and (stats[1]["p50_ms_min"], stats[1]["p50_ms_max"]) == (1, 3)
    assert stats[32]["req_per_s"] == 1000.0 and stats[32]["rounds"] == 3
    assert stats[32]["errors"] == 4
    assert stats[32]["error_kinds"] == {"http_429": 3, "timeout": 1}
    assert results._errors(stats) == "4 (http_429 3, timeout 1)"


def test_ratios_and_which_targets_bind():
    rows = results.aggregate(
        [
            _run("sepconv", "v1", 0.8, 950.0),
            _run("sepconv", "oip-json", 0.9, 700.0),
            _run("sepconv", "oip-binary", 0.85, 960.0),
            _run("fastapi", "v1", 1.0, 300.0),
            _run("kserve", "oip-json", 5.0, 400.0),
        ]
    )
    raw = [*RAW, {**RAW[0], "role": "lone", "batch_latency_ms_p50": 0.75}]
    default = {r["key"]: r for r in results.ratios("default", rows, raw)}
    assert default["c1_p50_vs_best_peer"]["ratio"] == pytest.approx(0.8)  # fastapi's 1.0 ms
    assert default["c1_p50_vs_best_peer"]["met"] is True
    assert default["c32_vs_best_peer"]["ratio"] == pytest.approx(950 / 400)  # KServe's 400/s
    assert default["c32_vs_best_peer"]["met"] is True and default["c32_vs_best_peer"]["target"]
    # Raw's largest batch (8 here, 1000 img/s), not the lone-request point.
    assert default["c32_vs_raw_batch"]["ratio"] == pytest.approx(0.95)
    assert default["c32_vs_raw_batch"]["met"] is True
    assert default["c32_vs_kserve"]["ratio"] == pytest.approx(1.75)  # same OIP request
    assert default["c32_vs_kserve"]["met"] is None  # information only now
    assert default["c32_v1_vs_raw"]["met"] is None  # the raw targets bind on 224 only
    assert default["c1_p50_vs_raw_lone"]["met"] is None

    big = {r["key"]: r for r in results.ratios("224", rows, raw)}
    assert big["c1_p50_vs_raw_lone"]["ratio"] == pytest.approx(0.8 / 0.75, abs=1e-3)
    assert big["c1_p50_vs_raw_lone"]["met"] is True and big["c1_p50_vs_raw_lone"]["target"]
    assert big["c32_v1_vs_raw"]["ratio"] == pytest.approx(0.95)
    assert big["c32_v1_vs_raw"]["met"] is True and big["c32_v1_vs_raw"]["target"] == ">= 0.95x"
    assert big["c32_oip_binary_vs_raw"]["met"] is True
    assert big["c32_vs_best_peer"]["met"] is None

    slow = results.aggregate([_run("sepconv", "v1", 2.0, 100.0), _run("fastapi", "v1", 1.0, 300.0)])
    worse = {r["key"]: r for r in results.ratios("default", slow, raw)}
    assert worse["c1_p50_vs_best_peer"]["met"] is False
    assert worse["c32_vs_best_peer"]["met"] is False

    # A server left out of the run leaves its comparisons out, not a division by nothing.
    only = results.aggregate([_run("sepconv", "v1", 0.8, 950.0)])
    assert [r["key"] for r in results.ratios("default", only, [])] == []


def test_markdown_report():
    runs = [
        _run("sepconv", "v1", 0.8, 950.0),
        _run("sepconv", "oip-json", 0.9, 900.0),
        _run("fastapi", "v1", 1.0, 300.0),
        _run("kserve", "oip-json", 5.0, 400.0),
    ]
    report = {
        "environment": {
            "command": "python -m bench.peers",
            "date": "2026-01-01 00:00 UTC",
            "cpu": "Test CPU",
            "cores": 2,
            "load_before": "1.00 1.00 1.00",
            "load_after": "2.00 2.00 2.00",
            "note": "Shared machine.",
            "commit": "abc1234",
            "sepconv_defaults": "workers 1",
            "versions": {"onnxruntime": "1.0", "fastapi": "0.1", "uvicorn": "0.2", "kserve": "9"},
            "duration_s": 5.0,
            "warmup_s": 1.0,
            "rounds": 1,
        },
        "models": [{"key": "default", "title": "Tiny", "raw": RAW, "runs": runs}],
    }
    text = results.markdown(report)
    assert "| sepconv-serve, no settings | `v1` | 0.80 | 1,250 | 20.00 | 950 | 60.00 | 0 |" in text
    assert "| KServe ModelServer | `oip-json` |" in text
    # /v1 at 950 req/s against the best peer's 400 (KServe), target 2x on the default model.
    assert "2.38x | 950.00 vs 400.00 req/s | >= 2.00x | yes |" in text
    assert "## Targets" in text and "| default | sepconv /v1 c=1 p50" in text
    assert "KServe 9" in text and "Shared machine." in text


def test_median_raw_per_batch():
    rounds = [
        [{"batch": 1, "images_per_s": 10.0}, {"batch": 8, "images_per_s": 50.0}],
        [{"batch": 1, "images_per_s": 30.0}, {"batch": 8, "images_per_s": 40.0}],
        [{"batch": 1, "images_per_s": 20.0}, {"batch": 8, "images_per_s": 60.0}],
    ]
    assert [r["images_per_s"] for r in median_raw(rounds)] == [20.0, 50.0]
    assert median_raw([]) == []
    # The lone request's point (batch 1 too) is kept apart from the throughput one.
    lone = [[{"batch": 1, "images_per_s": 99.0, "role": "lone"}, *rnd] for rnd in rounds]
    assert [(r.get("role"), r["images_per_s"]) for r in median_raw(lone)] == [
        ("lone", 99.0),
        (None, 20.0),
        (None, 50.0),
    ]


# --- peer venvs, without creating one -----------------------------------------------------------


def test_peer_venv_pins_the_libraries_that_compute(tmp_path):
    wanted = venvs.KSERVE.requirements()
    assert wanted[0] == "kserve"
    for package in venvs.PINNED_HERE:
        assert f"{package}=={venvs.current_version(package)}" in wanted
    with pytest.raises(venvs.PeerSetupError, match="--no-install"):
        venvs.ensure_venv(venvs.KSERVE, tmp_path, install=False)


def test_peer_venv_is_reused_when_its_stamp_matches(tmp_path):
    venv = tmp_path / "kserve-venv"
    python = venvs.venv_python(venv)
    python.parent.mkdir(parents=True)
    python.write_text("")
    stamp = {"requirements": venvs.KSERVE.requirements(), "versions": {"kserve": "0.21.0"}}
    (venv / venvs.STAMP).write_text(json.dumps(stamp))
    assert venvs.ensure_venv(venvs.KSERVE, tmp_path, install=False) == python
    assert venvs.installed_version(venv, "kserve") == "0.21.0"
    # A stale stamp (onnxruntime changed here) is not reused.
    stamp["requirements"] = ["kserve", "onnxruntime==0.0.1"]
    (venv / venvs.STAMP).write_text(json.dumps(stamp))
    with pytest.raises(venvs.PeerSetupError):
        venvs.ensure_venv(venvs.KSERVE, tmp_path, install=False)


def _existing_kserve_python() -> Path | None:
    try:
        return venvs.ensure_venv(venvs.KSERVE, install=False)
    except venvs.PeerSetupError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(
    _existing_kserve_python() is None,
    reason="no KServe venv (created by `python -m bench.peers`; never in tests)",
)
def test_kserve_peer_answers_oip_json(tiny, tmp_path):
    requests = contenders.requests_for("oip-json", tiny, count=1)
    kserve_python = _existing_kserve_python()
    with contenders.start("kserve", tiny, tmp_path / "k.log", kserve_python=kserve_python) as s:
        answer = contenders.post(s.base_url, requests, requests.bodies[0])
    image = base64.b64decode(json.loads(requests.bodies[0])["inputs"][0]["data"][0])
    contenders.check_answer("oip-json", answer, reference_probs(tiny, image))
    labels = json.loads(answer)["outputs"][0]["data"]
    assert len(labels) == len(TINY_LABELS)
