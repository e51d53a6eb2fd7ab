"""Every knob of the service, in one place, read from ``SEPCONV_*`` environment variables.

Validation fails fast at start-up: a typo in a value stops the server with a message naming the
variable, instead of surfacing as a confusing error under load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sepconv.hardware import available_cores

Provider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormat = Literal["text", "json"]
#: ``SEPCONV_WORKERS=auto`` stops here: every worker holds its own model copy and ORT arena, and
#: with many workers each one's queue sees too little traffic to form batches.
MAX_AUTO_WORKERS = 8


class Settings(BaseSettings):
    """Service configuration. Each field is the env var ``SEPCONV_<FIELD NAME IN CAPITALS>``."""

    model_config = SettingsConfigDict(
        env_prefix="SEPCONV_",
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
        validate_default=True,
    )

    # --- model and runtime
    model_path: Path = Field(
        Path("artifacts/model.onnx"),
        description="ONNX model to serve, or a folder holding it (KServe's /mnt/models): "
        "model.onnx there, else its only .onnx file.",
    )
    model_repository: Path | None = Field(
        None,
        description="Serve every model in this folder, Triton's layout: "
        "<dir>/<name>/<version>/model.onnx, numeric versions, an optional "
        "<dir>/<name>/config.json for the version policy (docs/models.md). Unset: "
        "SEPCONV_MODEL_PATH is served as a repository of one model.",
    )
    default_model: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The model /v1 requests without ?model= go to; unset = the alphabetically "
        "first model loaded.",
    )
    repository_poll_s: float = Field(
        0.0,
        ge=0,
        description="Look for new, changed and removed model versions every this many seconds "
        "(a file is loaded once it held still for one interval); 0 = off, load and unload "
        "through the API (POST /v2/repository/models/<name>/load).",
    )
    model_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name to serve the model under (the OIP URLs /v2/models/<name>, "
        "/v1/models, responses, metrics); unset = the name in the model's metadata. KServe "
        "passes the InferenceService name.",
    )
    provider: Provider = Field(
        "auto", description="auto: CUDA when onnxruntime offers it, else CPU. cuda: CUDA or fail."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ORT threads inside one operator; 0 = cores / (workers x lanes), never "
        "oversubscribed.",
    )
    lone_request_threads: int = Field(
        0,
        ge=0,
        description="ORT threads for a request that is alone: no other request in progress in "
        "this worker nor in any other (a shared flag per worker). 0 = every core, so a lone "
        "heavy request uses the whole machine while a loaded server keeps one thread per "
        "lane; a value at or below SEPCONV_INTRA_OP_THREADS turns it off. It costs a second "
        "ORT session per model version.",
    )
    inter_op_threads: int = Field(
        1, ge=1, description="ORT threads across operators; MobileNet is a chain, so 1."
    )
    ort_memory_arena: bool = Field(
        True,
        description="ONNX Runtime's CPU memory arena: a run's buffers are kept for the next "
        "one. Off, every run maps and faults in fresh pages: 224 px, runs of 8, 12,500 page "
        "faults and 28% more CPU per run. The arena grows to the largest run it served, so "
        "SEPCONV_RUN_MEMORY_MB bounds it; it is freed with its model version.",
    )
    ort_spinning: bool = Field(
        False,
        description="Let idle ORT threads busy-wait. Off by default: spinning steals the "
        "cores the event loop needs to decode the next requests.",
    )
    warmup_runs: int = Field(2, ge=0, description="Warm-up inferences per batch shape.")
    inline_inference_max_ms: float = Field(
        1.0,
        ge=0,
        description="A lone request on an idle server runs on the event loop, without a thread "
        "hop, when the model's measured single-image time is at most this (the 28 px default "
        "model: about 0.1 ms; a 224 px model never). 0 turns it off.",
    )

    # --- HTTP and gRPC servers
    host: str = Field("127.0.0.1", description="Listen address.")
    port: int = Field(8000, ge=1, le=65535, description="Listen port.")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Server processes, each with the model, a batcher and its own SO_REUSEPORT "
        f"socket (the kernel spreads connections). auto: one per core, at most "
        f"{MAX_AUTO_WORKERS} (per-request Python work runs on one event loop per process, so a "
        "second process doubled throughput on 2 cores); 1 gives the lowest single-request "
        "latency on big models.",
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the gRPC Open Inference Protocol server (Triton's default); 0 turns "
        "gRPC off. Same host, process and batcher as HTTP.",
    )
    worker_index: int | None = Field(
        None,
        ge=0,
        description="Internal: this worker's number among the supervisor's workers (its slot "
        "in the flags that tell a worker whether the others are busy).",
    )
    control_dir: Path | None = Field(
        None,
        description="Internal: the folder where the worker processes of one server agree on "
        "model loads (set by the supervisor to a fresh temporary folder).",
    )
    log_level: LogLevel = Field("info", description="Log level for the service and uvicorn.")
    log_format: LogFormat = Field(
        "text",
        description="text, or json: one JSON object per line (time, level, logger, message, "
        "request_id, trace_id).",
    )
    tracing: bool = Field(
        False,
        description="Export OpenTelemetry traces of inference requests; the exporter is "
        "configured by the standard OTEL_* variables (docs/protocols.md, Tracing).",
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="On SIGTERM, how long /readyz (and /v2/health/ready) answer 503 while "
        "every request is still served, with Connection: close, before the server stops "
        "accepting: time for load balancers to take it out. 0 = stop at once (SIGINT always "
        "does).",
    )
    graceful_shutdown_s: float = Field(
        10.0,
        gt=0,
        description="After the drain delay, how long open requests may finish before the "
        "server exits anyway (drain delay + this must stay under the orchestrator's kill "
        "grace period).",
    )

    # --- input limits
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Largest request body.")
    max_pixels: int = Field(
        40_000_000, gt=0, description="Largest decoded image (width x height); bomb guard."
    )
    max_images_per_request: int = Field(
        16, ge=1, description="Most images in one multipart request."
    )
    inline_decode_max_pixels: int = Field(
        256 * 256,
        ge=0,
        description="Requests whose images hold at most this many pixels in all (read from "
        "the headers) are decoded on the event loop, saving a thread hop; larger ones in a "
        "thread, so a big image never stalls other requests.",
    )

    # --- batcher
    lanes: int = Field(
        1,
        ge=1,
        description="Batches run at once, each in its own thread on the shared ORT session. "
        "Lanes = cores (ORT threads then default to 1 per lane) gives the most throughput on "
        "large inputs; 1 lane with multi-threaded ORT the lowest single-request latency.",
    )
    max_batch_size: int = Field(32, ge=1, description="Most images in one ORT run.")
    inference_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="Nice value of the inference threads (Linux): the event loop (admission, "
        "refusals, decoding) runs first when both want a core. At 4x overload on the 224 px "
        "model it cut the refusals' p99 from 96 to 9 ms and raised goodput from 0.81x to 0.88x "
        "of capacity. 0 keeps the process's priority. ORT's own pool threads (intra-op threads "
        "> 1) are not affected.",
    )
    run_memory_mb: int = Field(
        16,
        ge=0,
        description="Images in one ORT run are limited so that the largest layer's input and "
        "output over them stays within this (read from the graph): a larger batch runs in "
        "pieces. A 224 px MobileNetV1 needs 4.6 MB per image, so runs of 3 images; its CPU "
        "time per image is the same at batch 1 as at 32 (11.5-12.4 ms) while ORT's buffers "
        "grow by 13.5 MB per image of the run. The 28 px default model is never split. "
        "0 = never split.",
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="How long a batch waits for company after its first request, when others "
        "are already queued. An idle queue never waits.",
    )
    max_queue_size: int = Field(
        512, ge=1, description="Queued images before new ones get 429 (load shedding)."
    )
    max_queue_delay_ms: float = Field(
        1000.0,
        gt=0,
        description="Latency budget: a request whose predicted wait (work queued ahead x the "
        "measured time per image) exceeds it is refused with 429 before its body is read or "
        "its image decoded. Bounds the queue in time, where max_queue_size bounds it in images. "
        "At 1000 ms, 32 closed-loop clients on the 224 px model on two cores never drew a 429 "
        "and 64 (about 450 ms of queue) rarely did; at 500 ms both drew thousands.",
    )
    refusal_rate_factor: float = Field(
        8.0,
        ge=0,
        description="Refusals are answered at once up to this many times the model's own "
        "rate (lanes / measured seconds per image); past that, each is held until its "
        "Retry-After before its 429, so clients that retry without waiting retry at the pace "
        "they were asked to and cannot take the cores from the model. 8 leaves the open-loop "
        "8x overload unpaced. 0 turns pacing off.",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Longest an image may wait for its result before a 504."
    )

    # --- web page
    dashboard_url: str = Field(
        "http://localhost:3000/d/sepconv-serve",
        pattern=r"^(https?://[^\s\"'<>]+|/[^\s\"'<>]*)?$",
        description="Where the page at / links for dashboards: an http(s) URL or a path on "
        "this server; the default is docker compose's Grafana dashboard, empty hides the link.",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must be at least max_batch_size "
                f"({self.max_batch_size}), or no batch could ever fill"
            )
        if self.model_repository is not None and "model_path" in self.model_fields_set:
            raise ValueError(
                "SEPCONV_MODEL_REPOSITORY and SEPCONV_MODEL_PATH are both set; a repository "
                "serves the models in its folder, a model path one file: set one of them"
            )
        if self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port and port are both {self.port}; give gRPC its own port, or 0 to turn "
                "it off"
            )
        return self

    @property
    def resolved_workers(self) -> int:
        """Explicit value, else one per core this process may use, up to MAX_AUTO_WORKERS."""
        if self.workers == "auto":
            return min(available_cores(), MAX_AUTO_WORKERS)
        return self.workers

    @property
    def resolved_lone_request_threads(self) -> int:
        """Threads for a lone request; 0 when that would be no more than the usual ones."""
        threads = self.lone_request_threads or available_cores()
        return threads if threads > self.resolved_intra_op_threads else 0

    @property
    def resolved_intra_op_threads(self) -> int:
        """Explicit value, else the cores divided among the concurrent ORT runs."""
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, available_cores() // (self.resolved_workers * self.lanes))
