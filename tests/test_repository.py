"""The model repository: several models and versions at once, version policies, loads that fail
without harm, tritonclient's load/unload/index over HTTP and gRPC, hot swaps that lose no
request, polling, readiness with no model, and workers that swap together.

Versions are tiny exports (tests/conftest.py) with different weights and the same contract, so
an answer tells which version gave it.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from bench.server import ServerProcess
from sepconv.spec import read_spec
from service.api.app import create_app
from service.engine.admission import Admission
from service.engine.batcher import Batcher
from service.engine.fleet import merge
from service.engine.lanes import Lanes
from service.engine.layout import LayoutError, VersionPolicy, read_config, scan_model
from service.settings import Settings

from .conftest import _build, png_bytes
from .test_grpc import Gate, Served, free_port, swapped
from .waiting import wait_until

PNG = {"Content-Type": "image/png"}
NAME = "tiny"


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """Model files: ``1`` (the session's tiny model), ``2`` and ``3`` (other weights, same
    contract), ``wide`` (32 px input: another contract), ``corrupt`` (half a file)."""
    root = tmp_path_factory.mktemp("versions")
    out = {"1": tiny_model_path}
    for key, seed in (("2", 11), ("3", 12)):
        out[key] = _build(root / key, color_mode="L", input_size=28, stem_stride=1, seed=seed)
    out["wide"] = _build(root / "wide", color_mode="L", input_size=32, stem_stride=1, seed=13)
    data = tiny_model_path.read_bytes()
    (root / "corrupt.onnx").write_bytes(data[: len(data) // 2])
    out["corrupt"] = root / "corrupt.onnx"
    return out


def place(repo: Path, name: str, version: str, source: Path) -> Path:
    """Put ``source`` at ``repo/name/version/model.onnx`` atomically (write, then rename)."""
    folder = repo / name / version
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.onnx.tmp"
    shutil.copyfile(source, tmp)
    tmp.replace(folder / "model.onnx")
    return folder / "model.onnx"


def settings(repo: Path, **overrides) -> Settings:
    values = dict(model_repository=repo, provider="cpu", warmup_runs=0, grpc_port=0)
    return Settings(**{**values, **overrides})


def reference(path: Path, blob: bytes) -> np.ndarray:
    """What a plain ORT run of ``path`` says about an image."""
    from sepconv.preprocess import preprocess_bytes

    spec = read_spec(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(
        None, {spec.input_name: preprocess_bytes(blob, spec, max_pixels=10**8)[None]}
    )
    e = np.exp(logits[0][0] - logits[0][0].max())
    return e / e.sum()


def probabilities(answer: dict) -> np.ndarray:
    ordered = sorted(answer["results"][0]["predictions"], key=lambda p: p["index"])
    return np.array([p["probability"] for p in ordered])


def index(client) -> list[tuple[str, str, str]]:
    return [
        (e["name"], e["version"], e["state"]) for e in client.post("/v2/repository/index").json()
    ]


@pytest.fixture
def image() -> bytes:
    rng = np.random.default_rng(3)
    return png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8))


# --- the layout on disk -------------------------------------------------------------------------


def test_version_policies_select_versions():
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy.model_validate({"latest": {"num_versions": 2}}).select([1, 3, 2]) == [2, 3]
    assert VersionPolicy.model_validate({"all": {}}).select([2, 1]) == [1, 2]
    specific = VersionPolicy.model_validate({"specific": {"versions": [1, 3, 7]}})
    assert specific.select([1, 2, 3]) == [1, 3]
    with pytest.raises(ValueError, match="not latest and all"):
        VersionPolicy.model_validate({"latest": {}, "all": {}})


def test_scan_reads_config_and_skips_what_is_not_a_version(tmp_path, versions):
    for version in ("1", "2", "3"):
        place(tmp_path, NAME, version, versions[version])
    (tmp_path / NAME / "draft").mkdir()
    (tmp_path / NAME / "4").mkdir()  # no model.onnx yet
    (tmp_path / NAME / "config.json").write_text(
        '{"version_policy": {"latest": {"num_versions": 2}}}'
    )
    folder = scan_model(tmp_path / NAME)
    assert [v.version for v in folder.versions] == ["2", "3"] and not folder.error
    assert "not a version" in folder.skipped["draft"] and "no model.onnx" in folder.skipped["4"]
    (tmp_path / NAME / "config.json").write_text('{"version_policy": {"newest": {}}}')
    assert "version_policy.newest" in scan_model(tmp_path / NAME).error
    (tmp_path / NAME / "config.json").write_text("{")
    with pytest.raises(LayoutError, match="not readable JSON"):
        read_config(tmp_path / NAME)


# --- several models, versions, policies --------------------------------------------------------


def test_two_models_served_at_once(tmp_path, versions, tiny_rgb_model_path, image):
    place(tmp_path, NAME, "1", versions["1"])
    place(tmp_path, "colour", "1", tiny_rgb_model_path)
    with TestClient(create_app(settings(tmp_path))) as c:
        assert index(c) == [("colour", "1", "READY"), (NAME, "1", "READY")]
        grey = c.post(f"/v1/classify?model={NAME}", content=image, headers=PNG).json()
        colour = c.post("/v1/classify?model=colour&version=1", content=image, headers=PNG).json()
        assert grey["model"] == {"name": NAME, "version": "1"}
        assert colour["model"] == {"name": "colour", "version": "1"}
        assert np.allclose(probabilities(grey), reference(versions["1"], image), atol=1e-5)
        assert np.allclose(probabilities(colour), reference(tiny_rgb_model_path, image), atol=1e-5)
        # Without ?model=, the alphabetically first model loaded (SEPCONV_DEFAULT_MODEL unset).
        assert (
            c.post("/v1/classify", content=image, headers=PNG).json()["model"]["name"] == "colour"
        )
        assert c.get(f"/v1/models?model={NAME}").json()["input"]["size"] == 28
        assert c.get("/v1/models?model=colour").json()["input"]["color_mode"] == "RGB"
        assert c.get("/v1/cost?model=colour").json() != c.get(f"/v1/cost?model={NAME}").json()
        # OIP by name, and each model's own metadata and config.
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]
        assert c.get("/v2/models/colour/config").json()["input"][0]["dims"] == [3, 32, 32]
        r = c.post("/v1/classify?model=resnet", content=image, headers=PNG)
        assert r.status_code == 404 and "'colour', 'tiny'" in r.json()["detail"]
        r = c.post(f"/v1/classify?model={NAME}&version=9", content=image, headers=PNG)
        assert r.status_code == 404 and "no version '9'" in r.json()["detail"]
        stats = c.get("/v2/models/stats").json()["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [("colour", "1"), (NAME, "1")]


def test_default_model_setting_and_version_policy(tmp_path, versions, image):
    for version in ("1", "2", "3"):
        place(tmp_path, NAME, version, versions[version])
    (tmp_path / NAME / "config.json").write_text(
        '{"version_policy": {"specific": {"versions": [1, 3]}}}'
    )
    with TestClient(create_app(settings(tmp_path, default_model=NAME))) as c:
        assert index(c) == [(NAME, "1", "READY"), (NAME, "3", "READY")]
        for version in ("1", "3"):
            answer = c.post(f"/v1/classify?version={version}", content=image, headers=PNG).json()
            assert answer["model"] == {"name": NAME, "version": version}
            assert np.allclose(
                probabilities(answer), reference(versions[version], image), atol=1e-5
            )
        # No version: the highest loaded.
        assert c.post("/v1/classify", content=image, headers=PNG).json()["model"]["version"] == "3"
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1", "3"]
        assert c.get(f"/v2/models/{NAME}/versions/2/ready").status_code == 404
        assert c.get(f"/v2/models/{NAME}/versions/3/ready").status_code == 200
        # The policy changes: the load applies it (version 3 goes, 2 comes).
        (tmp_path / NAME / "config.json").write_text(
            '{"version_policy": {"specific": {"versions": [1, 2]}}}'
        )
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert index(c) == [(NAME, "1", "READY"), (NAME, "2", "READY")]


# --- loads that fail keep the working version -------------------------------------------------


def _loads(outcome: str, version: str) -> float:
    labels = {"model": NAME, "version": version, "outcome": outcome}
    return REGISTRY.get_sample_value("sepconv_model_loads_total", labels) or 0.0


def test_corrupt_file_and_contract_change_never_replace_a_working_version(
    tmp_path, versions, image, caplog
):
    place(tmp_path, NAME, "1", versions["1"])
    with TestClient(create_app(settings(tmp_path))) as c:
        before = c.post("/v1/classify", content=image, headers=PNG).json()
        failed_before = _loads("failed", "2")
        place(tmp_path, NAME, "2", versions["corrupt"])
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and "version 2" in r.json()["error"]
        assert "not a readable ONNX model" in r.json()["error"]
        entries = {e["version"]: e for e in c.post("/v2/repository/index").json()}
        assert entries["1"]["state"] == "READY"
        assert entries["2"]["state"] == "UNAVAILABLE" and "readable" in entries["2"]["reason"]
        assert _loads("failed", "2") == failed_before + 1
        assert "cannot load model tiny version 2" in caplog.text
        assert c.post("/v1/classify", content=image, headers=PNG).json() == before
        assert c.get("/readyz").status_code == 200
        # A model that never loaded has load metrics, but no engine series.
        place(tmp_path, "broken", "1", versions["corrupt"])
        assert c.post("/v2/repository/models/broken/load").status_code == 400
        broken = {"model": "broken", "version": "1"}
        assert REGISTRY.get_sample_value("sepconv_images_classified_total", broken) is None
        assert REGISTRY.get_sample_value(
            "sepconv_model_loads_total", {**broken, "outcome": "failed"}
        )
        shutil.rmtree(tmp_path / "broken")
        assert c.post("/v2/repository/models/broken/unload").status_code == 200

        # A different input contract (32 px): refused too, version 1 still serves.
        place(tmp_path, NAME, "3", versions["wide"])
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and "contract differs from version 1's" in r.json()["error"]
        assert "input_size 28 -> 32" in r.json()["error"]
        assert c.post("/v1/classify", content=image, headers=PNG).json() == before

        # A good file replaces the bad one: it loads, and version 1 (latest-1 policy) goes.
        place(tmp_path, NAME, "3", versions["3"])
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert index(c) == [(NAME, "3", "READY")]
        answer = c.post("/v1/classify", content=image, headers=PNG).json()
        assert np.allclose(probabilities(answer), reference(versions["3"], image), atol=1e-5)


def test_unknown_model_and_bad_parameters_are_4xx(tmp_path, versions):
    place(tmp_path, NAME, "1", versions["1"])
    with TestClient(create_app(settings(tmp_path))) as c:
        r = c.post("/v2/repository/models/nope/load")
        assert r.status_code == 404 and "no model 'nope'" in r.json()["error"]
        r = c.post(f"/v2/repository/models/{NAME}/load", json={"parameters": {"config": "{}"}})
        assert r.status_code == 400 and "not supported" in r.json()["error"]
        assert c.post("/v2/repository/models/nope/unload").status_code == 404


# --- readiness ------------------------------------------------------------------------------


def test_not_ready_with_zero_models_then_ready_after_a_load(tmp_path, versions, image):
    with TestClient(create_app(settings(tmp_path))) as c:
        assert c.get("/readyz").status_code == 503
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/health/live").status_code == 200
        assert c.post("/v2/repository/index").json() == []
        r = c.post("/v1/classify", content=image, headers=PNG)
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        place(tmp_path, NAME, "1", versions["1"])
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/classify", content=image, headers=PNG).status_code == 200
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        assert c.get("/readyz").status_code == 503
        assert index(c) == [(NAME, "", "UNAVAILABLE")]
        r = c.post("/v1/classify", content=image, headers=PNG)
        assert r.status_code == 503  # no model at all: nothing to route a default request to
        r = c.post(f"/v1/classify?model={NAME}", content=image, headers=PNG)
        assert r.status_code == 404 and "is not loaded" in r.json()["detail"]


# --- tritonclient over HTTP and gRPC -------------------------------------------------------------


@pytest.fixture
def served_repository(tmp_path, versions):
    place(tmp_path, NAME, "1", versions["1"])
    server = Served(create_app(settings(tmp_path, grpc_port=free_port())))
    yield server, tmp_path
    server.stop()


def test_tritonclient_http_load_unload_and_index(served_repository, versions):
    server, repo = served_repository
    with thttp.InferenceServerClient(server.http_url) as client:
        assert "model_repository" in client.get_server_metadata()["extensions"]
        place(repo, NAME, "2", versions["2"])
        client.load_model(NAME)
        assert client.get_model_repository_index() == [
            {"name": NAME, "version": "2", "state": "READY", "reason": ""}
        ]
        assert client.is_model_ready(NAME, "2") and not client.is_model_ready(NAME, "1")
        client.unload_model(NAME)
        assert not client.is_server_ready() and not client.is_model_ready(NAME)
        (entry,) = client.get_model_repository_index()
        assert entry["state"] == "UNAVAILABLE" and entry["reason"] == "unloaded"
        place(repo, NAME, "3", versions["corrupt"])
        with pytest.raises(InferenceServerException, match="version 3"):
            client.load_model(NAME)
        shutil.rmtree(repo / NAME / "3")
        client.load_model(NAME)
        assert client.is_server_ready() and client.is_model_ready(NAME, "2")


def test_tritonclient_grpc_load_unload_and_index(served_repository, versions):
    server, repo = served_repository
    with tgrpc.InferenceServerClient(server.grpc_url) as client:
        place(repo, NAME, "2", versions["2"])
        client.load_model(NAME)
        (model,) = client.get_model_repository_index().models
        assert (model.name, model.version, model.state) == (NAME, "2", "READY")
        inp = tgrpc.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        assert client.infer(NAME, [inp]).get_response().model_version == "2"
        client.unload_model(NAME)
        assert not client.is_server_ready()
        (model,) = client.get_model_repository_index().models
        assert (model.state, model.reason) == ("UNAVAILABLE", "unloaded")
        with pytest.raises(InferenceServerException, match="no model 'ghost'"):
            client.load_model("ghost")
        client.load_model(NAME)
        assert client.is_model_ready(NAME)


# --- hot swap with nothing lost ----------------------------------------------------------------


def test_requests_in_flight_during_a_swap_finish_on_the_old_version(
    served_repository, versions, image
):
    """Hold version 1 on a batch with requests queued behind it, load version 2: a new request
    goes to 2 at once, the held ones finish on 1, then 1 is released."""
    server, repo = served_repository
    url = f"http://{server.http_url}"
    repository = server.state.repository
    old = repository.lookup(NAME).classifier
    gate = Gate(old.batcher.run_batch)
    answers: dict[str, list[dict]] = {"held": [], "fresh": []}

    def ask(kind: str) -> None:
        r = httpx.post(f"{url}/v1/classify", content=image, headers=PNG, timeout=30)
        answers[kind].append(r.json())

    with swapped(old.batcher, run_batch=gate, inline_max_s=0.0):
        held = [threading.Thread(target=ask, args=("held",)) for _ in range(4)]
        for thread in held:
            thread.start()
        gate.wait_entered()
        wait_until(lambda: old.batcher.backlog == 4, message="4 requests held at the gate")
        place(repo, NAME, "2", versions["2"])
        loading = threading.Thread(
            target=lambda: httpx.post(f"{url}/v2/repository/models/{NAME}/load", timeout=60)
        )
        loading.start()
        with httpx.Client(base_url=url) as control:
            wait_until(
                lambda: index(control) == [(NAME, "1", "UNLOADING"), (NAME, "2", "READY")],
                message="version 2 ready, version 1 unloading",
            )
        # The one lane is held by version 1's batch: the new request waits on version 2.
        fresh = threading.Thread(target=ask, args=("fresh",))
        fresh.start()
        new = repository.lookup(NAME, "2").classifier
        wait_until(lambda: new.batcher.backlog == 1, message="the new request on version 2")
        assert old.batcher.backlog == 4 and not answers["held"]
        gate.opened.set()
        for thread in (*held, fresh, loading):
            thread.join(60)
    assert [a["model"]["version"] for a in answers["held"]] == ["1"] * 4
    for answer in answers["held"]:
        assert np.allclose(probabilities(answer), reference(versions["1"], image), atol=1e-5)
    (answer,) = answers["fresh"]
    assert answer["model"]["version"] == "2"
    assert np.allclose(probabilities(answer), reference(versions["2"], image), atol=1e-5)
    with httpx.Client(base_url=url) as control:
        assert index(control) == [(NAME, "2", "READY")]
    assert old.runtime.session is None  # released once its requests were answered


def test_swaps_under_concurrent_load_answer_every_request(served_repository, versions, image):
    server, repo = served_repository
    url = f"http://{server.http_url}"
    statuses: list[int] = []
    stop = threading.Event()

    async def load_loop():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one_client():
                while not stop.is_set():
                    r = await client.post("/v1/classify", content=image, headers=PNG)
                    statuses.append(r.status_code)

            await asyncio.gather(*(one_client() for _ in range(8)))

    runner = threading.Thread(target=lambda: asyncio.run(load_loop()))
    runner.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as control:
            for version in ("2", "3", "4"):
                place(repo, NAME, version, versions["2" if version == "4" else version])
                assert control.post(f"/v2/repository/models/{NAME}/load").status_code == 200
            assert index(control) == [(NAME, "4", "READY")]
    finally:
        stop.set()
        runner.join(30)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


# --- polling --------------------------------------------------------------------------------


def test_polling_loads_new_versions_and_unloads_removed_models(tmp_path, versions, image):
    place(tmp_path, NAME, "1", versions["1"])
    with TestClient(create_app(settings(tmp_path, repository_poll_s=0.1))) as c:
        place(tmp_path, NAME, "2", versions["2"])
        wait_until(lambda: index(c) == [(NAME, "2", "READY")], message="version 2 polled in")
        answer = c.post("/v1/classify", content=image, headers=PNG).json()
        assert answer["model"]["version"] == "2"
        # A corrupt new version is refused once, and not retried while it does not change.
        place(tmp_path, NAME, "3", versions["corrupt"])
        wait_until(lambda: (NAME, "3", "UNAVAILABLE") in index(c), message="version 3 refused")
        assert (NAME, "2", "READY") in index(c)
        # An explicit unload is not undone by the next poll.
        shutil.rmtree(tmp_path / NAME / "3")
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        # Three polls later the unloaded model is still unloaded.
        polls = c.app.state.repository.polls
        wait_until(lambda: c.app.state.repository.polls >= polls + 3, "three more polls")
        assert index(c) == [(NAME, "", "UNAVAILABLE")]
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        shutil.rmtree(tmp_path / NAME)
        wait_until(lambda: index(c) == [], message="the removed model unloaded")
        assert c.get("/readyz").status_code == 503


# --- several worker processes ----------------------------------------------------------------


@pytest.mark.slow
def test_every_worker_swaps_and_the_index_says_when(tmp_path, versions, image):
    repo = tmp_path / "repo"
    place(repo, NAME, "1", versions["1"])
    env = {
        "SEPCONV_WORKERS": "2",
        "SEPCONV_MODEL_REPOSITORY": str(repo),
        "SEPCONV_WARMUP_RUNS": "0",
    }
    with ServerProcess(None, env, tmp_path / "server.log", ready_timeout_s=60) as server:
        url = server.base_url
        place(repo, NAME, "2", versions["2"])
        r = httpx.post(f"{url}/v2/repository/models/{NAME}/load", timeout=60)
        assert r.status_code == 200, server.log_tail()
        # The load answered once both workers had swapped: every connection, whichever
        # worker the kernel hands it to, gets version 2 now.
        assert httpx.post(f"{url}/v2/repository/index").json() == [
            {"name": NAME, "version": "2", "state": "READY", "reason": ""}
        ]
        seen = set()
        for _ in range(20):
            with httpx.Client(base_url=url) as fresh:  # a new connection each time
                seen.add(
                    fresh.post("/v1/classify", content=image, headers=PNG).json()["model"][
                        "version"
                    ]
                )
        assert seen == {"2"}
        r = httpx.post(f"{url}/v2/repository/models/{NAME}/unload", timeout=60)
        assert r.status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503


def test_fleet_merge_reports_partial_progress():
    def worker(*entries):
        return {
            "models": [
                dict(zip(("name", "version", "state", "reason"), e, strict=True)) for e in entries
            ]
        }

    both = [worker(("m", "1", "READY", "")), worker(("m", "1", "READY", ""))]
    assert merge(both, 2) == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]
    half = [worker(("m", "2", "READY", "")), worker(("m", "2", "LOADING", ""))]
    (entry,) = merge(half, 2)
    assert entry["state"] == "LOADING" and entry["reason"].startswith("READY in 1 of 2 workers")
    (entry,) = merge([worker(("m", "2", "READY", ""))], 2)
    assert entry["state"] == "LOADING" and "1 not yet reporting" in entry["reason"]
    failed = [
        worker(("m", "3", "UNAVAILABLE", "bad file")),
        worker(("m", "3", "UNAVAILABLE", "bad file")),
    ]
    assert merge(failed, 2) == [
        {"name": "m", "version": "3", "state": "UNAVAILABLE", "reason": "bad file"}
    ]


# --- shared cores -----------------------------------------------------------------------------


def test_admission_counts_every_models_work_on_the_shared_lanes():
    async def scenario():
        lanes = Lanes(1)
        a = Batcher(lambda x: x, lanes=lanes)
        b = Batcher(lambda x: x, lanes=lanes)
        a.record_batch(1, 0.1)  # 100 ms per image
        b.record_batch(1, 0.01)
        admit_a = Admission(a, max_delay_s=1.0)
        admit_b = Admission(b, max_delay_s=1.0)
        admit_a.reserved = 5  # half a second of model A's work admitted
        wait_b = admit_b.predicted_wait()
        admit_a.close()
        await lanes.close()
        return wait_b, admit_b.predicted_wait()

    wait_b, after = asyncio.run(scenario())
    assert wait_b == pytest.approx(0.5)  # B waits behind A's work on the same core
    assert after == 0.0  # A unloaded: its work no longer counts


def test_a_new_version_starts_from_the_timings_of_the_one_it_replaces(tmp_path, versions):
    """Timed on the loader's low-priority thread under load, a new version's first figure can
    be many times its real cost; admission control would then refuse what it could serve."""
    place(tmp_path, NAME, "1", versions["1"])
    with TestClient(create_app(settings(tmp_path))) as c:
        old = c.app.state.repository.lookup(NAME).classifier.batcher
        old.image_seconds, old.nominal_image_seconds = 0.0123, 0.0111
        place(tmp_path, NAME, "2", versions["2"])
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        new = c.app.state.repository.lookup(NAME).classifier.batcher
        assert new is not old
        assert (new.image_seconds, new.nominal_image_seconds) == (0.0123, 0.0111)
