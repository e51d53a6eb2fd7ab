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

from sepconv.spec import ModelSpec
from service.protocols import oip

if TYPE_CHECKING:
    from service.settings import Settings

#: Listed in the server metadata next to the OIP extensions. The repository index is served
#: too, but not ``model_repository``: that name promises load and unload, and this server
#: serves the one model it loaded at start-up.
EXTENSIONS = ("model_configuration", "statistics")
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


def model_statistics(spec: ModelSpec, stats: ModelStats) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for the served model (Triton's ``ModelStatisticsResponse``)."""
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
        ]
    }


def repository_index(spec: ModelSpec, *, ready: bool, ready_only: bool) -> list[dict[str, str]]:
    """The repository index: the one served model, ``READY`` or ``UNAVAILABLE``.

    ``ready_only`` (the request's ``ready: true``) leaves out a model that is not ready.
    """
    if ready_only and not ready:
        return []
    entry = {"name": spec.name, "version": spec.version, "state": "READY", "reason": ""}
    if not ready:
        entry.update(state="UNAVAILABLE", reason="loading, warming up or shutting down")
    return [entry]
