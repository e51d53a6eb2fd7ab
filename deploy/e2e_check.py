"""HTTP half of the end-to-end test (deploy/e2e.sh): drive the containerised API, then ask the
containerised Prometheus for what it scraped, and evaluate every Grafana panel's PromQL there,
and every autoscaling query (the prometheus-adapter rule and the KEDA ScaledObject in
deploy/k8s/). With ``--repository`` (the host folder compose mounts at /models), roll out
version 2 of the model under traffic and roll it back, with no failed request.

Standard library plus Pillow (for the test images) and PyYAML (for the manifests); with
``--grpc``, grpcio too (a serving dependency, so the repository's venv has it) for the gRPC half.
Exits non-zero with a message naming what is missing; writes a JSON summary to --out.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import yaml
from PIL import Image

#: The labels the e2e Prometheus puts on its one target (prometheus.e2e.yml), standing in for
#: the ones the Prometheus Operator's ServiceMonitor adds in a cluster.
E2E_NAMESPACE = "sepconv-serve"
E2E_POD = "sepconv-serve-e2e"


def png(seed: int) -> bytes:
    img = Image.new("L", (28, 28))
    img.putdata([(x * 7 + seed * 31) % 256 for x in range(28 * 28)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def request(url: str, body: bytes | None = None, headers: dict | None = None, timeout=30):
    """(status, headers, parsed JSON or text); HTTP errors are results, not exceptions."""
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, raw = err.code, err.headers, err.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for i, data in enumerate(files):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def expect(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"e2e_check: FAILED: {what}")


def big_png(seed: int, side: int = 1024) -> bytes:
    """An image whose decoding takes milliseconds (a million pixels), so a request holds its
    place in the queue while later ones arrive."""
    img = Image.linear_gradient("L").resize((side, side)).rotate(seed * 7 % 360)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def burst(api: str, body: bytes, ctype: str, clients: int) -> list[tuple[int, str | None]]:
    """``clients`` POST /v1/classify at once, on connections opened beforehand: (status,
    Retry-After) of each."""
    url = urllib.parse.urlsplit(api)
    connections = [http.client.HTTPConnection(url.hostname, url.port) for _ in range(clients)]
    for conn in connections:
        conn.connect()
    start = threading.Barrier(clients)
    answers: list[tuple[int, str | None]] = []

    def send(conn: http.client.HTTPConnection) -> None:
        start.wait()
        conn.request("POST", "/v1/classify", body, {"Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        answers.append((resp.status, resp.getheader("Retry-After")))
        conn.close()

    threads = [threading.Thread(target=send, args=(conn,)) for conn in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return answers


def shed_load(api: str, clients: int = 16, rounds: int = 5) -> int:
    """Load shedding: ``clients`` requests of 4 large images (the queue's size) at once; some
    are refused with 429 and a Retry-After, the others answered. Bounded: at most ``rounds``
    bursts, until one sees a 429."""
    body, ctype = multipart([big_png(i) for i in range(4)])
    for _ in range(rounds):
        answers = burst(api, body, ctype, clients)
        statuses = sorted(status for status, _ in answers)
        expect(len(answers) == clients, f"a burst of {clients} got {len(answers)} answers")
        expect(set(statuses) <= {200, 429}, f"a burst of {clients} requests -> {statuses}")
        retry_after = [after for status, after in answers if status == 429]
        if retry_after:
            expect(all(retry_after), f"a 429 without Retry-After: {retry_after}")
            return 429
    expect(False, f"{rounds} bursts of {clients} requests of 4 images, queue of 4: no 429")
    return 200


def classify_one(api: str, seed: int) -> dict:
    status, _, body = request(f"{api}/v1/classify", png(seed), {"Content-Type": "image/png"})
    expect(status == 200, f"POST /v1/classify (raw PNG) -> {status} {body}")
    return body


def prom_query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, _, body = request(url)
    expect(status == 200 and body.get("status") == "success", f"Prometheus query {expr!r}: {body}")
    return body["data"]["result"]


def has_number(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def dashboard_exprs(path: str) -> list[tuple[str, str]]:
    """(panel [refId], PromQL) of every panel query, its template variables set to "All" as
    Grafana sends them (``$model`` -> the variable's allValue)."""
    with open(path) as f:
        dash = json.load(f)
    values = {v["name"]: v["allValue"] for v in dash.get("templating", {}).get("list", [])}

    def expand(expr: str) -> str:
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: values.get(m.group(1) or m.group(2), m.group(0)),
            expr,
        )

    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{panel['title']} [{target['refId']}]", expand(target["expr"])))
    return out


def adapter_rules(path) -> list[dict]:
    """The custom rules of the prometheus-adapter Helm values file."""
    with open(path) as f:
        return yaml.safe_load(f)["rules"]["custom"]


def autoscaling_queries(k8s_dir, namespace: str, pods: list[str]) -> list[tuple[str, str]]:
    """(name, PromQL) of every autoscaling query, as the adapter and KEDA would run them.

    The adapter fills its templates per HPA request: the series, a namespace and pod matcher
    for the pods of the scale target, and `pod` to group by (per-pod metrics).
    """
    out = []
    for rule in adapter_rules(f"{k8s_dir}/autoscaling/prometheus-adapter-values.yaml"):
        series = re.match(r"\s*([a-zA-Z_:][\w:]*)", rule["seriesQuery"]).group(1)
        matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod")
        )
        out.append((f"prometheus-adapter {rule['name']['as']}", expr))
    with open(f"{k8s_dir}/components/keda/scaledobject.yaml") as f:
        scaled = yaml.safe_load(f)
    for trigger in scaled["spec"]["triggers"]:
        if trigger["type"] == "prometheus":
            out.append((f"keda {scaled['metadata']['name']}", trigger["metadata"]["query"]))
    return out


class Traffic:
    """Clients classifying images until stopped (bounded: ``clients`` requests in flight, a
    pause after each): what every request got, and from which version."""

    def __init__(self, api: str, name: str, clients: int = 2, pause_s: float = 0.02) -> None:
        self.url = f"{api}/v1/classify?model={urllib.parse.quote(name)}"
        self.pause_s = pause_s
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[int, str | None]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        sent = 0
        while not self.done.is_set():
            try:
                status, _, body = request(
                    self.url, png(client * 1000 + sent % 97), {"Content-Type": "image/png"}
                )
            except OSError as exc:  # refused or reset: a failure, not the end of the check
                status, body = 0, repr(exc)
            version = body["model"]["version"] if status == 200 else None
            with self.lock:
                self.answers.append((status, version))
                if status != 200:
                    self.failures.append(f"{status} {body}")
            sent += 1
            time.sleep(self.pause_s)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def versions(self) -> list[str | None]:
        with self.lock:
            return [version for _, version in self.answers]


def repository_index(api: str, name: str) -> dict[str, str]:
    """``POST /v2/repository/index``: the model's versions and their states."""
    status, _, body = request(f"{api}/v2/repository/index", b"", {})
    expect(status == 200 and isinstance(body, list), f"repository index -> {status} {body}")
    return {e["version"]: e["state"] for e in body if e["name"] == name}


def model_info(api: str, name: str) -> dict[str, float]:
    """``sepconv_model_info`` of the model on /metrics, by version: 1 serving, 0 unloaded."""
    status, _, text = request(f"{api}/metrics")
    expect(status == 200, f"/metrics -> {status}")
    out = {}
    for line in text.splitlines():
        if line.startswith("sepconv_model_info{") and f'model="{name}"' in line:
            version = re.search(r'version="([^"]*)"', line).group(1)
            out[version] = float(line.rsplit(" ", 1)[1])
    return out


def wait_for_index(api: str, name: str, want: dict[str, str], deadline_s: float, why: str):
    deadline = time.monotonic() + deadline_s
    while (seen := repository_index(api, name)) != want:
        expect(time.monotonic() < deadline, f"{why}: index {seen} after {deadline_s:.0f} s")
        time.sleep(0.5)


def check_rollout(api: str, repository: Path, name: str, deadline_s: float) -> dict:
    """Version 2 in place (a temporary name, then a rename), loaded through Triton's repository
    API, replaces version 1 (the default policy serves the latest one); removing it brings
    version 1 back through the server's polling. Two clients classify all along: every request
    must succeed."""
    before = repository_index(api, name)
    expect(before == {"1": "READY"}, f"before the rollout, {name}'s index is {before}")
    version_dir = repository / name / "2"
    with Traffic(api, name) as traffic:
        time.sleep(1)  # version 1 answers first
        version_dir.mkdir()
        partial = version_dir / ".model.onnx.tmp"
        shutil.copyfile(repository / name / "1" / "model.onnx", partial)
        partial.chmod(0o644)
        os.replace(partial, version_dir / "model.onnx")
        started = time.monotonic()
        status, _, body = request(f"{api}/v2/repository/models/{name}/load", b"", {}, 120)
        load_s = time.monotonic() - started
        expect(status == 200, f"load {name} with version 2 in place -> {status} {body}")
        after = repository_index(api, name)
        expect(after == {"2": "READY"}, f"after loading version 2, {name}'s index is {after}")
        body = classify_one(api, 7)
        expect(body["model"]["version"] == "2", f"after the load, answered by {body['model']}")
        status, _, _ = request(f"{api}/v2/models/{name}/versions/1/ready")
        expect(status != 200, f"version 1 still ready after the rollout ({status})")
        info = model_info(api, name)
        expect(info.get("2") == 1 and info.get("1") == 0, f"sepconv_model_info: {info}")
        time.sleep(1)  # version 2 answers the clients

        shutil.rmtree(version_dir)
        started = time.monotonic()
        wait_for_index(
            api, name, {"1": "READY"}, deadline_s, "version 2 removed, polling (compose: 10 s)"
        )
        rollback_s = time.monotonic() - started
        expect(classify_one(api, 8)["model"]["version"] == "1", "the rollback serves version 1")
        time.sleep(1)
    versions = traffic.versions()
    expect(not traffic.failures, f"requests failed during the rollout: {traffic.failures[:5]}")
    expect({"1", "2"} <= set(versions), f"the clients never saw both versions: {set(versions)}")
    expect(versions[-1] == "1", f"the last answer came from version {versions[-1]}")
    return {
        "requests": len(versions),
        "failed": 0,
        "answered_by_version": {v: versions.count(v) for v in sorted(set(versions))},
        "load_call_s": round(load_s, 2),
        "rollback_by_polling_s": round(rollback_s, 2),
    }


def check_grpc(address: str, name: str) -> dict:
    """grpc.health.v1 says SERVING, and an image classified over the Open Inference Protocol."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's generated code
    from service.protocols.oip_grpc import inference_pb2 as pb
    from service.protocols.oip_grpc import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        expect(health.status == health_pb2.HealthCheckResponse.SERVING, f"gRPC health: {health}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=name)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.inputs[0].contents.bytes_contents.append(png(5))
        output = request.outputs.add(name="probabilities")
        output.parameters["classification"].int64_param = 1
        response, call = stub.ModelInfer.with_call(
            request, timeout=30, metadata=(("x-request-id", "e2e-grpc"),)
        )
        top = response.raw_output_contents[0][4:].decode()
        expect(top.count(":") >= 2, f"gRPC classification: {response}")
        echoed = dict(call.initial_metadata()).get("x-request-id")
        expect(echoed == "e2e-grpc", f"gRPC x-request-id echoed as {echoed!r}")
    return {"health": "SERVING", "top1": top}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--k8s", required=True, help="deploy/k8s: the autoscaling queries")
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline-s", type=float, default=120)
    ap.add_argument("--grpc", help="host:port of the API's gRPC server, checked when given")
    ap.add_argument(
        "--repository",
        type=Path,
        help="the host folder the API serves as its model repository: roll out version 2 there",
    )
    ap.add_argument("--model", default="fashion-mnist", help="the model to roll out")
    args = ap.parse_args()
    api, prom = args.api, args.prometheus
    summary: dict = {}

    status, _, body = request(f"{api}/readyz")
    expect(status == 200, f"/readyz -> {status} {body}")
    status, _, models = request(f"{api}/v1/models")
    expect(status == 200, f"/v1/models -> {status} {models}")

    # Classify through the container: raw body and multipart.
    body = classify_one(api, 1)
    expect(len(body["results"]) == 1 and body["results"][0]["predictions"], f"classify: {body}")
    top = body["results"][0]["predictions"][0]
    summary["classified"] = {"model": body["model"], "top1": top}
    data, ctype = multipart([png(2), png(3)])
    status, _, body = request(f"{api}/v1/classify", data, {"Content-Type": ctype})
    expect(status == 200 and len(body["results"]) == 2, f"multipart classify -> {status} {body}")

    if args.grpc:
        summary["grpc"] = check_grpc(args.grpc, models["name"])

    # A client error: JSON naming the problem, never a 500.
    status, _, body = request(f"{api}/v1/classify", b"not a png", {"Content-Type": "image/png"})
    expect(400 <= status < 500 and "error" in body, f"corrupt image -> {status} {body}")
    summary["corrupt_image_status"] = status

    # compose.e2e.yml sets a queue of 4: 16 images in one request can never fit (413, a retry
    # cannot help), and a burst of requests that each fit overflows it (429, retry later).
    data, ctype = multipart([png(i) for i in range(16)])
    status, _, body = request(f"{api}/v1/classify", data, {"Content-Type": ctype})
    expect(status == 413 and body.get("error") == "too_many_rows", f"16 images -> {status} {body}")
    summary["too_many_images_status"] = status
    summary["overload_status"] = shed_load(api)

    # Traffic while Prometheus scrapes: rates need two scrapes with requests in between.
    panels = dashboard_exprs(args.dashboard)
    histogram = 'sepconv_http_request_duration_seconds_bucket{route="/v1/classify"}'
    deadline = time.monotonic() + args.deadline_s
    sent, missing = 3, ["(not queried yet)"]
    while time.monotonic() < deadline:
        for i in range(10):
            classify_one(api, sent + i)
        sent += 10
        if not has_number(prom_query(prom, histogram)):
            missing = [histogram]
            time.sleep(1)
            continue
        missing = [name for name, expr in panels if not has_number(prom_query(prom, expr))]
        if not missing:
            break
        time.sleep(1)
    expect(not missing, f"no data from Prometheus for: {missing}")

    buckets = prom_query(prom, histogram)
    inf = [r for r in buckets if r["metric"].get("le") == "+Inf" and r["metric"]["status"] == "200"]
    expect(inf and float(inf[0]["value"][1]) > 0, f"latency histogram has no requests: {buckets}")
    summary["latency_histogram"] = {
        "series": len(buckets),
        "requests_200": float(inf[0]["value"][1]),
        "p99_s": float(
            prom_query(
                prom, 'job_route:sepconv_http_request_duration_seconds:p99_5m{route="/v1/classify"}'
            )[0]["value"][1]
        ),
    }
    provider = prom_query(prom, "sepconv_model_info")[0]["metric"]
    keys = ("model", "version", "provider", "precision")
    summary["model_info"] = {k: provider.get(k) for k in keys}
    summary["dashboard_queries_with_data"] = len(panels)
    with open(args.dashboard) as f:
        summary["dashboard_panels"] = len(json.load(f)["panels"])
    summary["requests_sent"] = sent

    # Autoscaling: each query returns a number for the pod, as the HPA would read it.
    scaling = {}
    for name, expr in autoscaling_queries(args.k8s, E2E_NAMESPACE, [E2E_POD]):
        result = prom_query(prom, expr)
        expect(has_number(result), f"autoscaling query {name} returned no data: {expr}")
        if name.startswith("prometheus-adapter"):
            expect(
                [r["metric"].get("pod") for r in result] == [E2E_POD],
                f"{name} must give one series per pod: {result}",
            )
        scaling[name] = float(result[0]["value"][1])
    # The queries take one off per pod for the scrape that reads the gauge: summed over the
    # pod's workers (one series each, by pid) it never drops below 1, because the /metrics
    # request is itself in flight, in one of them, while it is rendered.
    floor = prom_query(prom, "min_over_time(sum by (pod) (sepconv_http_requests_in_flight)[5m:2s])")
    expect(
        floor and min(float(r["value"][1]) for r in floor) >= 1,
        f"in-flight gauge seen below 1: {floor}",
    )
    summary["autoscaling_queries"] = scaling

    # Rules loaded and healthy, targets up.
    _, _, rules = request(f"{prom}/api/v1/rules")
    loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]
    expect(all(r["health"] == "ok" for r in loaded), f"unhealthy rules: {loaded}")
    summary["rules_loaded"] = len(loaded)
    _, _, targets = request(f"{prom}/api/v1/targets")
    active = targets["data"]["activeTargets"]
    expect(active and all(t["health"] == "up" for t in active), f"targets: {active}")

    # Last: everything above ran on version 1.
    if args.repository:
        summary["rollout"] = check_rollout(api, args.repository, args.model, args.deadline_s)

    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print("e2e_check: OK", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
