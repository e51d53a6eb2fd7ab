"""KServe's conventions, taken through settings with no wrapper script: a model folder
(/mnt/models), the InferenceService name as the served model name, KServe's flag spellings;
and the ClusterServingRuntime's environment is a valid configuration of this server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.engine.runtime import ModelLoadError, find_model_file
from service.settings import Settings
from tests.images import API_IMAGES, image_env

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "deploy" / "k8s" / "kserve" / "clusterservingruntime.yaml"


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_a_folder_serves_its_model_onnx_first(tmp_path, tiny_model_path):
    _copy(tiny_model_path, tmp_path / "model.int8.onnx")
    _copy(tiny_model_path, tmp_path / "model.onnx")
    (tmp_path / "model_card.json").write_text("{}")
    assert find_model_file(tmp_path) == tmp_path / "model.onnx"
    assert find_model_file(tmp_path / "model.int8.onnx") == tmp_path / "model.int8.onnx"


def test_a_folder_with_one_onnx_file_serves_it(tmp_path, tiny_model_path):
    _copy(tiny_model_path, tmp_path / "fashion.onnx")
    assert find_model_file(tmp_path) == tmp_path / "fashion.onnx"


def test_an_ambiguous_or_empty_folder_is_refused_by_name(tmp_path, tiny_model_path):
    with pytest.raises(ModelLoadError, match="holds no .onnx file"):
        find_model_file(tmp_path)
    _copy(tiny_model_path, tmp_path / "a.onnx")
    _copy(tiny_model_path, tmp_path / "b.onnx")
    with pytest.raises(ModelLoadError, match=r"several \.onnx files \(a\.onnx, b\.onnx\)"):
        find_model_file(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_model_file(tmp_path / "missing")


def test_the_model_is_served_under_the_configured_name(tmp_path, tiny_model_path, make_png):
    _copy(tiny_model_path, tmp_path / "model.onnx")
    settings = Settings(
        model_path=tmp_path, model_name="fashion-mnist", provider="cpu", warmup_runs=0
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/fashion-mnist/ready").json()["ready"] is True
        meta = client.get("/v2/models/fashion-mnist").json()
        assert meta["name"] == "fashion-mnist"
        assert client.get("/v2/models/tiny-l").status_code == 404  # the metadata's own name
        assert client.get("/v1/models").json()["name"] == "fashion-mnist"
        body = client.post(
            "/v1/classify", content=make_png(2), headers={"Content-Type": "image/png"}
        ).json()
        assert body["model"]["name"] == "fashion-mnist"
        metrics = client.get("/metrics").text
        assert 'sepconv_model_info{model="fashion-mnist"' in metrics


@pytest.mark.parametrize("name", ["", "has space", "-leading", "a/b"])
def test_a_model_name_that_cannot_be_a_url_segment_is_refused(name):
    with pytest.raises(ValidationError, match="model_name"):
        Settings(model_name=name)


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_kserve_flag_spellings_reach_the_settings(tmp_path):
    proc = _serve("--model_dir", str(tmp_path), "--model_name", "iris", "--http_port", "8080")
    assert proc.returncode == 1
    assert f"the model folder {tmp_path} holds no .onnx file" in proc.stderr
    proc = _serve("--model_dir", str(tmp_path), "--model_name", "not a name")
    assert proc.returncode == 2 and "model_name" in proc.stderr


def test_the_serving_runtime_configures_this_server(monkeypatch):
    runtime = yaml.safe_load(RUNTIME.read_text())
    (container,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    fields = {f"SEPCONV_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("SEPCONV_")} - fields
    assert not unknown, f"not settings: {unknown}"
    # KServe fills {{.Name}} with the InferenceService's name, a DNS label.
    assert env["SEPCONV_MODEL_NAME"] == "{{.Name}}"
    # Over the image's own ENV: the runtime names a model file, so the image must name no
    # model location of its own (a repository there and a file here would be refused).
    assert container["image"].rsplit(":", 1)[0] in API_IMAGES
    for key in [k for k in os.environ if k.startswith("SEPCONV_")]:
        monkeypatch.delenv(key)
    image = image_env(API_IMAGES[container["image"].rsplit(":", 1)[0]])
    for key, value in {**image, **env}.items():
        if key.startswith("SEPCONV_"):
            monkeypatch.setenv(key, value.replace("{{.Name}}", "fashion-mnist"))
    settings = Settings()
    assert settings.model_path == Path("/mnt/models")
    assert settings.model_name == "fashion-mnist"
    assert settings.host == "0.0.0.0" and settings.port == 8080
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == settings.port
    threads = settings.resolved_workers * settings.lanes * settings.intra_op_threads
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == str(threads)
