"""Prometheus metrics (default registry) and the engine observer that records them.

Names follow Prometheus conventions: base units (seconds), ``_total`` on counters, and the
``route`` label is the route template (``/v2/models/{name}/infer``), never the raw path
(:class:`service.api.middleware.MetricsMiddleware` records HTTP traffic).
"""

from __future__ import annotations

import asyncio
import os
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client import multiprocess as _multiprocess

from service.engine.observer import EngineObserver

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
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "sepconv_inference_duration_seconds",
    "ONNX Runtime session.run time per batch.",
    buckets=LATENCY_BUCKETS,
)
IMAGES_CLASSIFIED = Counter(
    "sepconv_images_classified_total", "Images that went through the model."
)
#: An info metric written as the gauge it is on the wire (``sepconv_model_info{...} 1``), because
#: prometheus_client's Info type does not work across worker processes.
MODEL_INFO = Gauge(
    "sepconv_model_info",
    "The served model and the execution provider that runs it.",
    ["name", "version", "provider", "precision"],
    multiprocess_mode="max",
)

BATCH_QUEUE_WAIT = Histogram(
    "sepconv_batch_queue_wait_seconds",
    "Time an image waited in the batch queue before its batch started.",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "sepconv_batch_size", "Images per batch sent to the model.", buckets=BATCH_SIZE_BUCKETS
)
BATCH_QUEUE_DEPTH = Gauge(
    "sepconv_batch_queue_depth",
    "Images waiting in the batch queue (summed over worker processes).",
    multiprocess_mode="livesum",
)
REFUSAL_HOLD = Histogram(
    "sepconv_refusal_hold_seconds",
    "How long refusals were held back before their 429, when they came faster than "
    "SEPCONV_REFUSAL_RATE_FACTOR x the model's rate (clients retrying without waiting).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BATCH_REJECTED = Counter(
    "sepconv_batch_rejected_total",
    "Images the batcher refused or gave up on, by reason (queue_full, timeout).",
    ["reason"],
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
    ["protocol", "outcome"],
)
REQUEST_STAGE = Counter(
    "sepconv_inference_request_stage_seconds",
    "Time successful inference requests spent in each stage: decode (and preprocess), queue "
    "(for a batch), infer (the model run), postprocess. One observation per request of "
    'sepconv_inference_request_duration_seconds{outcome="ok"}.',
    ["stage"],
)
REQUEST_STAGES = ("decode", "queue", "infer", "postprocess")
LAST_INFERENCE = Gauge(
    "sepconv_last_inference_timestamp_seconds",
    "Unix time of the last batch the model ran.",
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
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)
    return registry


def set_model_info(name: str, version: str, provider: str, precision: str) -> None:
    if not multiprocess_enabled():
        # One process may load a model more than once (tests); a worker loads exactly one, and
        # prometheus_client cannot clear labels in multiprocess mode.
        MODEL_INFO.clear()
    MODEL_INFO.labels(name, version, provider, precision).set(1)


def mark_process_dead() -> None:
    """Drop this worker's live gauges from the shared files when it exits."""
    if multiprocess_enabled():
        _multiprocess.mark_process_dead(os.getpid())


class PrometheusObserver(EngineObserver):
    """The engine's hooks, recorded in the metrics above."""

    def __init__(self) -> None:
        self._rejected = {}
        self._requests = {}
        self._stages = [REQUEST_STAGE.labels(stage) for stage in REQUEST_STAGES]

    def preprocessed(self, seconds: float) -> None:
        PREPROCESS_DURATION.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        BATCH_QUEUE_DEPTH.set(depth)

    def rejected(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = BATCH_REJECTED.labels(reason)
        child.inc()

    def refusal_held(self, seconds: float) -> None:
        REFUSAL_HOLD.observe(seconds)

    def batch_started(self, size: int, queue_waits, contexts) -> None:
        for wait in queue_waits:
            BATCH_QUEUE_WAIT.observe(wait)
        BATCH_SIZE.observe(size)

    def inference(self, seconds: float, batch_size: int) -> None:
        INFERENCE_DURATION.observe(seconds)

    def classified(self, images: int) -> None:
        IMAGES_CLASSIFIED.inc(images)
        LAST_INFERENCE.set(time.time())

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
            child = self._requests[key] = INFERENCE_REQUESTS.labels(*key)
        child.observe(seconds)
        if error is None:
            stages = self._stages
            stages[0].inc(ctx.decode_s)
            stages[1].inc(ctx.queue_s)
            stages[2].inc(ctx.infer_s)
            stages[3].inc(ctx.postprocess_s)


def inference_counters() -> dict[str, tuple[float, float]]:
    """The counters Triton's statistics are made of, summed over label values and worker
    processes: ``{name: (count, sum)}`` for ``request_ok``, ``request_error``, each
    ``stage_<name>``, ``runs`` (model runs, seconds), ``images`` (count only) and
    ``last_inference`` (Unix time, as the sum)."""
    out: dict[str, list[float]] = {}

    def add(key: str, count: float = 0.0, total: float = 0.0) -> None:
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
                    add(f"stage_{sample.labels['stage']}", total=sample.value)
        elif family.name in wanted:
            for sample in family.samples:
                key = wanted[family.name](sample.labels)
                if sample.name.endswith("_count"):
                    add(key, count=sample.value)
                elif sample.name.endswith("_sum"):
                    add(key, total=sample.value)
        elif family.name == IMAGES_CLASSIFIED._name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    add("images", count=sample.value)
        elif family.name == LAST_INFERENCE._name:
            for sample in family.samples:
                entry = out.setdefault("last_inference", [0.0, 0.0])
                entry[1] = max(entry[1], sample.value)
    # Each stage is counted once per successful request.
    ok = out.get("request_ok", [0.0, 0.0])[0]
    for stage in REQUEST_STAGES:
        out.setdefault(f"stage_{stage}", [0.0, 0.0])[0] = ok
    return {key: (count, total) for key, (count, total) in out.items()}
