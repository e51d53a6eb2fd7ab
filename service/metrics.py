"""Prometheus metrics (default registry) and the engine observer that records them.

Names follow Prometheus conventions: base units (seconds), ``_total`` on counters, and the
``route`` label is the route template (``/v2/models/{name}/infer``), never the raw path
(:class:`service.api.middleware.ServiceMiddleware` records HTTP traffic). Every series the
engine writes carries the ``model`` and ``version`` it is about: each loaded version has its own
:class:`PrometheusObserver`, which binds the label children once, off the hot path.
"""

from __future__ import annotations

import asyncio
import os
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client import multiprocess as _multiprocess

from service import metric_values
from service.engine.observer import EngineObserver, RepositoryObserver

# With several workers, every value below writes to the shared files in batches.
metric_values.install()

MODEL = ["model", "version"]
#: Sub-millisecond to seconds: a 28px image takes ~0.1 ms to preprocess, a 224px batch ~100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

HTTP_REQUESTS = Counter(
    "sepconv_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "sepconv_http_request_duration_seconds",
    "End-to-end HTTP request latency, by route template, method and status code.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("sepconv_http_requests_in_flight", "HTTP requests being handled right now.")
PREPROCESS_DURATION = Histogram(
    "sepconv_preprocess_duration_seconds",
    "Decode and preprocess time per image.",
    MODEL,
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "sepconv_inference_duration_seconds",
    "ONNX Runtime session.run time per batch.",
    MODEL,
    buckets=LATENCY_BUCKETS,
)
IMAGES_CLASSIFIED = Counter(
    "sepconv_images_classified_total", "Images that went through the model.", MODEL
)
#: An info metric written as the gauge it is on the wire (``sepconv_model_info{...} 1``), because
#: prometheus_client's Info type does not work across worker processes.
MODEL_INFO = Gauge(
    "sepconv_model_info",
    "1 for each model version loaded and serving (0 once unloaded), with the execution "
    "provider that runs it.",
    [*MODEL, "provider", "precision"],
    multiprocess_mode="max",
)
MODEL_LOADS = Counter(
    "sepconv_model_loads_total",
    "Model version loads, by outcome (ok, failed: the reason is in the log and in "
    "/v2/repository/index; whatever served before still does).",
    [*MODEL, "outcome"],
)
MODEL_LOAD_DURATION = Histogram(
    "sepconv_model_load_duration_seconds",
    "Time to load, check and warm up a model version before it takes traffic.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

BATCH_QUEUE_WAIT = Histogram(
    "sepconv_batch_queue_wait_seconds",
    "Time an image waited in the batch queue before its batch started.",
    MODEL,
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "sepconv_batch_size", "Images per batch sent to the model.", MODEL, buckets=BATCH_SIZE_BUCKETS
)
BATCH_QUEUE_DEPTH = Gauge(
    "sepconv_batch_queue_depth",
    "Images waiting in the batch queue (summed over worker processes).",
    MODEL,
    multiprocess_mode="livesum",
)
REFUSAL_HOLD = Histogram(
    "sepconv_refusal_hold_seconds",
    "How long refusals were held back before their 429 (until their Retry-After), when they "
    "came faster than SEPCONV_REFUSAL_RATE_FACTOR x the model's rate (clients retrying "
    "without waiting).",
    MODEL,
    buckets=(0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0),
)
BATCH_REJECTED = Counter(
    "sepconv_batch_rejected_total",
    "Images the batcher refused or gave up on, by reason (queue_full, timeout).",
    [*MODEL, "reason"],
)

# Per inference request, whatever its protocol: what Triton's statistics extension reports
# (GET /v2/models/{name}/stats is read from these, so the two never disagree).
# Count and sum only (a summary and counters, not histograms): per-request latency percentiles
# are the HTTP and gRPC histograms' job, and these sit on every request's path (12.9 us per
# request with five histograms, 5.4 us so; timeit on this project's 2-core machine under load).
INFERENCE_REQUESTS = Summary(
    "sepconv_inference_request_duration_seconds",
    "Time inference requests spent in the engine, from decoding to probabilities, by protocol "
    "and outcome (ok, error, cancelled).",
    [*MODEL, "protocol", "outcome"],
)
REQUEST_STAGE = Counter(
    "sepconv_inference_request_stage_seconds",
    "Time successful inference requests spent in each stage: decode (and preprocess), queue "
    "(for a batch), infer (the model run), postprocess. One observation per request of "
    'sepconv_inference_request_duration_seconds{outcome="ok"}.',
    [*MODEL, "stage"],
)
REQUEST_STAGES = ("decode", "queue", "infer", "postprocess")
LAST_INFERENCE = Gauge(
    "sepconv_last_inference_timestamp_seconds",
    "Unix time of the last batch the model ran.",
    MODEL,
    multiprocess_mode="max",
)
GRPC_REQUESTS = Counter(
    "sepconv_grpc_requests_total",
    "gRPC calls answered, by method and status code.",
    ["method", "code"],
)
GRPC_DURATION = Histogram(
    "sepconv_grpc_request_duration_seconds",
    "gRPC call latency in the server, by method and status code.",
    ["method", "code"],
    buckets=LATENCY_BUCKETS,
)


def multiprocess_enabled() -> bool:
    """Several worker processes share metrics through files in ``PROMETHEUS_MULTIPROC_DIR``."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition_registry() -> CollectorRegistry:
    """The registry /metrics renders: all workers' files when there are several, else ours."""
    if not multiprocess_enabled():
        return REGISTRY
    metric_values.flush()  # this process's latest, the others' at most a flush interval old
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)
    return registry


def mark_process_dead() -> None:
    """Drop this worker's live gauges from the shared files when it exits."""
    if multiprocess_enabled():
        metric_values.flush()
        _multiprocess.mark_process_dead(os.getpid())


class PrometheusObserver(EngineObserver):
    """One model version's engine hooks, recorded in the metrics above."""

    def __init__(self, model: str = "", version: str = "") -> None:
        labels = (model, version)
        self.labels = labels
        self._preprocess = PREPROCESS_DURATION.labels(*labels)
        self._depth = BATCH_QUEUE_DEPTH.labels(*labels)
        self._hold = REFUSAL_HOLD.labels(*labels)
        self._queue_wait = BATCH_QUEUE_WAIT.labels(*labels)
        self._batch_size = BATCH_SIZE.labels(*labels)
        self._inference = INFERENCE_DURATION.labels(*labels)
        self._classified = IMAGES_CLASSIFIED.labels(*labels)
        self._last = LAST_INFERENCE.labels(*labels)
        self._stages = [REQUEST_STAGE.labels(*labels, stage) for stage in REQUEST_STAGES]
        self._rejected = {}
        self._requests = {}

    def preprocessed(self, seconds: float) -> None:
        self._preprocess.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def rejected(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = BATCH_REJECTED.labels(*self.labels, reason)
        child.inc()

    def refusal_held(self, seconds: float) -> None:
        self._hold.observe(seconds)

    def batch_started(self, size: int, queue_waits, contexts) -> None:
        for wait in queue_waits:
            self._queue_wait.observe(wait)
        self._batch_size.observe(size)

    def inference(self, seconds: float, batch_size: int) -> None:
        self._inference.observe(seconds)

    def classified(self, images: int) -> None:
        self._classified.inc(images)
        self._last.set(time.time())

    def request_finished(self, ctx, started: float, seconds: float, error) -> None:
        if error is None:
            outcome = "ok"
        elif isinstance(error, asyncio.CancelledError):
            outcome = "cancelled"  # the client went away or its deadline passed
        else:
            outcome = "error"
        key = (ctx.protocol or "other", outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = INFERENCE_REQUESTS.labels(*self.labels, *key)
        child.observe(seconds)
        if error is None:
            stages = self._stages
            stages[0].inc(ctx.decode_s)
            stages[1].inc(ctx.queue_s)
            stages[2].inc(ctx.infer_s)
            stages[3].inc(ctx.postprocess_s)


def _changed() -> None:
    """Which versions serve is written for every worker's /metrics at once, not with the next
    batch of values: a load or unload answers only once every worker has applied it, and
    its metrics must say so by then."""
    if metric_values.installed():
        metric_values.flush()


class RepositoryMetrics(RepositoryObserver):
    """Loads, failed loads and unloads, and which versions are serving (``sepconv_model_info``)."""

    def __init__(self) -> None:
        self._info: dict[tuple[str, str], tuple[str, str]] = {}

    def model_loaded(self, name: str, version: str, seconds: float, runtime) -> None:
        MODEL_LOADS.labels(name, version, "ok").inc()
        MODEL_LOAD_DURATION.labels(name).observe(seconds)
        extra = (runtime.providers[0], runtime.spec.precision)
        self._info[(name, version)] = extra
        MODEL_INFO.labels(name, version, *extra).set(1)
        _changed()

    def model_load_failed(self, name: str, version: str, reason: str) -> None:
        MODEL_LOADS.labels(name, version, "failed").inc()

    def model_unloaded(self, name: str, version: str) -> None:
        extra = self._info.pop((name, version), None)
        if extra is not None:
            # 0, not removed: prometheus_client cannot remove a series from other processes'
            # files, and "was serving, is not" is worth seeing.
            MODEL_INFO.labels(name, version, *extra).set(0)
        _changed()


Counters = dict[str, tuple[float, float]]


def inference_counters() -> dict[tuple[str, str], Counters]:
    """The counters Triton's statistics are made of, per (model, version), summed over the
    other labels and over worker processes: ``{name: (count, sum)}`` for ``request_ok``,
    ``request_error``, each ``stage_<name>``, ``runs`` (model runs, seconds), ``images`` (count
    only) and ``last_inference`` (Unix time, as the sum)."""
    per_model: dict[tuple[str, str], dict[str, list[float]]] = {}

    def add(labels: dict, key: str, count: float = 0.0, total: float = 0.0) -> None:
        out = per_model.setdefault((labels["model"], labels["version"]), {})
        entry = out.setdefault(key, [0.0, 0.0])
        entry[0] += count
        entry[1] += total

    wanted = {
        INFERENCE_REQUESTS._name: lambda labels: f"request_{labels['outcome']}",
        INFERENCE_DURATION._name: lambda labels: "runs",
    }
    for family in exposition_registry().collect():
        if family.name == REQUEST_STAGE._name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    add(sample.labels, f"stage_{sample.labels['stage']}", total=sample.value)
        elif family.name in wanted:
            for sample in family.samples:
                key = wanted[family.name](sample.labels)
                if sample.name.endswith("_count"):
                    add(sample.labels, key, count=sample.value)
                elif sample.name.endswith("_sum"):
                    add(sample.labels, key, total=sample.value)
        elif family.name == IMAGES_CLASSIFIED._name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    add(sample.labels, "images", count=sample.value)
        elif family.name == LAST_INFERENCE._name:
            for sample in family.samples:
                labels = sample.labels
                out = per_model.setdefault((labels["model"], labels["version"]), {})
                entry = out.setdefault("last_inference", [0.0, 0.0])
                entry[1] = max(entry[1], sample.value)
    result = {}
    for key, out in per_model.items():
        # Each stage is counted once per successful request.
        ok = out.get("request_ok", [0.0, 0.0])[0]
        for stage in REQUEST_STAGES:
            out.setdefault(f"stage_{stage}", [0.0, 0.0])[0] = ok
        result[key] = {name: (count, total) for name, (count, total) in out.items()}
    return result
