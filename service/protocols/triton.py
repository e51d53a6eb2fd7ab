"""Triton's extensions to the Open Inference Protocol: model configuration, statistics and the
model repository index, as documents (pure functions, no framework).

The REST routes answer these dicts as JSON, and the gRPC servicer fills the same dicts into the
protobuf messages of Triton's ``grpc_service.proto``, so both transports say the same thing.
Field names and types follow Triton's ``docs/protocol/extension_model_configuration.md``,
``extension_statistics.md`` and ``extension_model_repository.md``, and what perf_analyzer reads:
it reads every ``inference_stats`` entry and its ``count`` and ``ns`` without checking they exist,
requires ``compute_input``, ``compute_infer`` and ``compute_output`` to have equal counts, and
parses ``version`` as an integer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from sepconv.spec import ModelSpec
from service.errors import InvalidRequest
from service.protocols import oip

if TYPE_CHECKING:
    from service.settings import Settings

#: Listed in the server metadata next to the OIP extensions.
EXTENSIONS = ("model_configuration", "model_repository", "statistics")
BACKEND = "onnxruntime"
#: Triton's statistic names in ``inference_stats``, in Triton's order.
INFERENCE_STATS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@dataclass(frozen=True, slots=True)
class Duration:
    """A Triton ``$duration_stat``: how many times, and their total in nanoseconds."""

    count: int = 0
    ns: int = 0

    @classmethod
    def from_seconds(cls, count: float, seconds: float) -> Duration:
        return cls(int(count), int(round(seconds * 1e9)))

    def document(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(frozen=True, slots=True)
class ModelStats:
    """The model's cumulative counters, as Triton defines them.

    Per request: ``success`` and ``fail`` (end-to-end time), ``queue`` (waiting for the batcher)
    and the three compute stages, each counted once per successful request. Per image:
    ``inference_count``. Per model run: ``execution_count``. There is no response cache, so
    ``cache_hit`` and ``cache_miss`` stay zero.
    """

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    durations: dict[str, Duration] = field(default_factory=dict)


#: Triton's per-request statistics and the engine's counters they are read from
#: (:func:`service.metrics.inference_counters`).
COUNTER_OF = {
    "success": "request_ok",
    "fail": "request_error",
    "queue": "stage_queue",
    "compute_input": "stage_decode",
    "compute_infer": "stage_infer",
    "compute_output": "stage_postprocess",
}


def model_stats_from(counters: dict[str, tuple[float, float]]) -> ModelStats:
    """Triton's statistics from the engine's ``{name: (count, seconds)}`` counters.

    ``compute_input`` is decoding and preprocessing (0 for tensor requests), ``queue`` the wait
    for a batch, ``compute_infer`` the model run, ``compute_output`` the softmax; each is
    observed once per successful request, so their counts are equal as perf_analyzer requires.
    """
    durations = {
        name: Duration.from_seconds(*counters.get(key, (0.0, 0.0)))
        for name, key in COUNTER_OF.items()
    }
    return ModelStats(
        inference_count=int(counters.get("images", (0.0, 0.0))[0]),
        execution_count=int(counters.get("runs", (0.0, 0.0))[0]),
        last_inference_ms=int(counters.get("last_inference", (0.0, 0.0))[1] * 1000),
        durations=durations,
    )


def statistics_of(
    specs: list[ModelSpec], counters: dict[tuple[str, str], dict[str, tuple[float, float]]]
) -> list[tuple[ModelSpec, ModelStats]]:
    """Each model version's statistics from the engine's counters
    (:func:`service.metrics.inference_counters`), zero for one not used yet."""
    return [(spec, model_stats_from(counters.get((spec.name, spec.version), {}))) for spec in specs]


def server_extensions() -> list[str]:
    return [*oip.EXTENSIONS, *EXTENSIONS]


def is_numeric_version(version: str) -> bool:
    """perf_analyzer reads model versions as integers (``std::stoll``)."""
    return version.isascii() and version.isdigit()


def model_config(
    spec: ModelSpec,
    *,
    max_batch_size: int,
    max_queue_delay_us: int,
    instances: int,
    gpu: bool,
) -> dict[str, Any]:
    """The model configuration (Triton's ``ModelConfig``, JSON field names of the proto).

    ``max_batch_size`` > 0 means every dim list below leaves out the batch dimension. Both inputs
    are ``optional`` because a request gives exactly one of them; perf_analyzer then sends the
    one its ``--input-data`` names. ``instances`` is the number of batches that run at once
    (``SEPCONV_LANES``), Triton's instance count.
    """
    side = spec.input_size
    return {
        "name": spec.name,
        "platform": oip.PLATFORM,
        "backend": BACKEND,
        "max_batch_size": max_batch_size,
        "input": [
            {
                "name": spec.input_name,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [spec.channels, side, side],
                "optional": True,
            },
            {
                # One encoded file per batch row; shape [N] and [N, 1] are both accepted.
                "name": oip.IMAGE_INPUT,
                "data_type": "TYPE_STRING",
                "format": "FORMAT_NONE",
                "dims": [1],
                "reshape": {"shape": []},
                "optional": True,
            },
        ],
        "output": [
            {"name": oip.OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [spec.num_classes]},
        ],
        "instance_group": [
            {"name": spec.name, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": instances}
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
    }


def served_model_config(spec: ModelSpec, settings: Settings, provider: str) -> dict[str, Any]:
    """:func:`model_config` of the served model, from the settings that shape its batching."""
    return model_config(
        spec,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=int(round(settings.max_wait_ms * 1000)),
        instances=settings.lanes,
        gpu=provider == "CUDAExecutionProvider",
    )


def model_statistics(models: list[tuple[ModelSpec, ModelStats]]) -> dict[str, Any]:
    """``{"model_stats": [...]}``, one entry per model version (Triton's
    ``ModelStatisticsResponse``)."""
    return {
        "model_stats": [
            {
                "name": spec.name,
                "version": spec.version,
                "last_inference": stats.last_inference_ms,
                "inference_count": stats.inference_count,
                "execution_count": stats.execution_count,
                "inference_stats": {
                    name: stats.durations.get(name, Duration()).document()
                    for name in INFERENCE_STATS
                },
            }
            for spec, stats in models
        ]
    }


def check_repository_parameters(action: str, parameters: dict[str, Any]) -> None:
    """The ``parameters`` of a load or unload request (Triton's model repository extension),
    refused unless this server does what they ask: a load may not override the model's
    configuration or send its files (the repository folder is the one source of models), and
    ``unload_dependents`` has nothing to act on (no ensembles)."""
    for key, value in parameters.items():
        if action == "unload" and key == "unload_dependents" and isinstance(value, bool):
            continue
        if key == "config" or key.startswith("file:"):
            raise InvalidRequest(
                f"parameter {key!r} is not supported: models are loaded from the repository "
                "folder as they are; put the file and its config.json there and load again"
            )
        raise InvalidRequest(f"unknown {action} parameter {key!r}")


def repository_request(body: bytes, action: str) -> None:
    """A load or unload request body over HTTP: empty, or ``{"parameters": {...}}``."""
    if not body.strip():
        return
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("parameters", {}), dict):
        raise InvalidRequest(f"a {action} request is a JSON object with optional 'parameters'")
    check_repository_parameters(action, document.get("parameters", {}))


def index_request(body: bytes) -> bool:
    """The repository index request body over HTTP: ``ready_only`` from ``{"ready": true}``."""
    if not body.strip():
        return False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("repository index request must be a JSON object")
    ready_only = document.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidRequest("'ready' must be true or false")
    return ready_only
