"""ONNX Runtime session wrapper: load, check against the metadata contract, warm up, run.

After creating the session we read back ``get_providers()``: ORT silently falls back to CPU when a
requested provider cannot start, and an operator must be able to see what really runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sepconv.spec import ModelSpec, SpecError, spec_from_bytes
from service.engine.observer import NULL_OBSERVER, EngineObserver

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says why and what to do."""


def choose_providers(provider: str) -> list[str]:
    """Providers to request, CPU last so ORT can place unsupported nodes there."""
    available = ort.get_available_providers()
    if provider == "cpu":
        return [CPU]
    if provider == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                "SEPCONV_PROVIDER=cuda but this onnxruntime build offers only "
                f"{available}; install onnxruntime-gpu and a CUDA driver, or use auto/cpu"
            )
        return [CUDA, CPU]
    if provider == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ModelLoadError(f"unknown provider {provider!r}; expected auto, cpu or cuda")


#: The file a folder is served from when it holds several .onnx files: what the build writes.
DEFAULT_MODEL_FILE = "model.onnx"


def find_model_file(path: str | Path) -> Path:
    """The ONNX file to serve: ``path`` itself, or the model in the folder ``path``.

    A folder is how KServe hands a model over (its storage initializer fills /mnt/models with
    whatever the storageUri holds): ``model.onnx`` is taken when present (a build's output
    folder also holds ``model.int8.onnx``), else the folder's only ``.onnx`` file.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelLoadError(
            f"model file {path} does not exist; build one with `python -m model build` or set "
            "SEPCONV_MODEL_PATH"
        )
    if (path / DEFAULT_MODEL_FILE).is_file():
        return path / DEFAULT_MODEL_FILE
    found = sorted(p for p in path.iterdir() if p.suffix == ".onnx" and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"the model folder {path} holds no .onnx file")
    names = ", ".join(p.name for p in found)
    raise ModelLoadError(
        f"the model folder {path} holds several .onnx files ({names}) and no "
        f"{DEFAULT_MODEL_FILE}; set SEPCONV_MODEL_PATH to one of them"
    )


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _analyze(model_bytes: bytes, path: Path):
    """(the cost report, None), or (None, the CostError) for a graph the analysis cannot read:
    counted once at load, while the bytes are at hand."""
    import onnx

    from sepconv.cost import CostError, analyze_model

    try:
        return analyze_model(onnx.load_from_string(model_bytes), path=str(path)), None
    except CostError as exc:
        return None, exc


class ModelRuntime:
    """A loaded model: ``spec`` from its metadata, ``providers`` that really run it."""

    def __init__(
        self,
        path: str | Path,
        *,
        provider: str = "auto",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        spinning: bool = False,
        observer: EngineObserver = NULL_OBSERVER,
        name: str | None = None,
        version: str | None = None,
        memory_arena: bool = True,
        lone_threads: int = 0,
    ) -> None:
        self.path = find_model_file(path)
        self.observer = observer
        # Read once: the session, the spec and the cost report all describe these exact bytes,
        # even if the file is replaced while the server runs. They are not kept (17 MB for a
        # 224 px model, in every worker): a profile reads the file again, if it is unchanged.
        model_bytes = self.path.read_bytes()
        self._file = _identity(self.path)
        try:
            self.spec: ModelSpec = spec_from_bytes(model_bytes, str(self.path))
        except SpecError as exc:
            raise ModelLoadError(f"cannot serve {self.path}: {exc}") from exc
        served = {k: v for k, v in (("name", name), ("version", version)) if v}
        if served:
            # Served under another name (KServe: the InferenceService's) or as a repository's
            # version (its folder's number); everything that names the model reads this spec,
            # so every protocol agrees on it.
            self.spec = self.spec.model_copy(update=served)

        requested = choose_providers(provider)

        def session(threads: int, spin: bool) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = inter_op_threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "01"[spin])
            opts.add_session_config_entry("session.inter_op.allow_spinning", "01"[spin])
            # ORT's CPU arena keeps every block it ever grew (onnxruntime#11627); without it,
            # the memory a run takes goes back to malloc, and a released session leaves
            # nothing behind.
            opts.enable_cpu_mem_arena = memory_arena
            try:
                return ort.InferenceSession(model_bytes, opts, providers=requested)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
                raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc

        self.session = session(intra_op_threads, spinning)
        #: A session with ``lone_threads`` intra-op threads, for a request alone on the
        #: machine (see :class:`service.engine.lanes.Lanes`); None when not wanted. Its threads
        #: spin between the operators of a run: nothing else is running then.
        self.lone_session = session(lone_threads, True) if lone_threads > intra_op_threads else None

        self.providers: list[str] = list(self.session.get_providers())
        if provider == "cuda" and self.providers[0] != CUDA:
            raise ModelLoadError(
                f"SEPCONV_PROVIDER=cuda but onnxruntime fell back to {self.providers}; "
                "check the CUDA/cuDNN libraries (see the onnxruntime warning above)"
            )
        if requested[0] != self.providers[0]:
            log.warning("requested %s but onnxruntime runs %s", requested, self.providers)
        self._check_io()
        self._output_names = [self.spec.output_name]
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.lone_threads = lone_threads if self.lone_session is not None else 0
        #: Most images in one ORT run: a larger batch runs in pieces (:meth:`limit_run_memory`).
        self.max_run_rows = 2**31
        #: Whether the run starting now is for a request alone on the machine (the loader
        #: sets it to the lanes' :meth:`~service.engine.lanes.Lanes.alone`).
        self.alone: Callable[[], bool] = lambda: False
        self._cost, self._cost_error = _analyze(model_bytes, self.path)
        log.info(
            "loaded %s (%s v%s, %s, %dpx %s, %d classes) on %s, intra_op_threads=%d",
            self.path,
            self.spec.name,
            self.spec.version,
            self.spec.precision,
            self.spec.input_size,
            self.spec.color_mode,
            self.spec.num_classes,
            self.providers,
            intra_op_threads,
        )

    def _check_io(self) -> None:
        """The graph must agree with its own metadata, or every answer would be wrong."""
        spec = self.spec
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if spec.input_name not in inputs or spec.output_name not in outputs:
            raise ModelLoadError(
                f"{self.path}: metadata names input {spec.input_name!r} and output "
                f"{spec.output_name!r}, the graph has {list(inputs)} -> {list(outputs)}"
            )
        shape = inputs[spec.input_name].shape
        expected = [spec.channels, spec.input_size, spec.input_size]
        if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != expected:
            raise ModelLoadError(
                f"{self.path}: graph input shape {shape} does not match the metadata "
                f"(N, {spec.channels}, {spec.input_size}, {spec.input_size})"
            )
        out_shape = outputs[spec.output_name].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != spec.num_classes:
            raise ModelLoadError(
                f"{self.path}: graph outputs {out_shape[-1]} classes, metadata lists "
                f"{spec.num_classes} labels"
            )

    def close(self) -> None:
        """Release the ONNX Runtime sessions (weights, arena and threads) now, rather than
        whenever the last reference to this object goes; the model must not run again."""
        self.session = None
        self.lone_session = None

    def cost_report(self):
        """The static cost report of the served graph, counted when it was loaded."""
        if self._cost is None:
            raise self._cost_error
        return self._cost

    def model_bytes(self) -> bytes:
        """The served file's bytes, read again; :class:`ModelLoadError` if it changed since."""
        data = self.path.read_bytes()
        if _identity(self.path) != self._file:
            raise ModelLoadError(
                f"{self.path} changed since it was loaded; load the model again to profile it"
            )
        return data

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.input_size, self.spec.input_size)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) -> logits (N, num_classes). Blocking: call from a worker thread.

        On the lone session when there is one and :attr:`alone` says the request is alone on
        the machine (asked here, as the run starts, so the answer is as fresh as can be)."""
        lone = self.lone_session
        session = lone if lone is not None and self.alone() else self.session
        start = time.perf_counter()
        out = self._infer(session, batch)
        self.observer.inference(time.perf_counter() - start, len(batch))
        return out

    def _infer(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        """One batch through ``session``, in runs of at most :attr:`max_run_rows` images."""
        feed = self.spec.input_name
        rows = self.max_run_rows
        if len(batch) <= rows:
            return session.run(self._output_names, {feed: batch})[0]
        return np.concatenate(
            [
                session.run(self._output_names, {feed: batch[i : i + rows]})[0]
                for i in range(0, len(batch), rows)
            ]
        )

    def limit_run_memory(self, budget_bytes: int) -> int:
        """Run at most as many images at once as keep the activations of one run within
        ``budget_bytes`` (from the graph's own layer sizes, :meth:`cost_report`); returns the
        rows. A 224 px MobileNetV1 costs the same CPU per image in runs of 3 as of 32, while
        ORT's buffers for a run grow with its images (``SEPCONV_RUN_MEMORY_MB``)."""
        from sepconv.cost import CostError

        try:
            per_image = self.cost_report().activation_bytes_per_image()
        except CostError as exc:  # a graph the analysis cannot read: run it whole
            log.warning("%s: cannot size its runs (%s); batches run whole", self.path, exc)
            return self.max_run_rows
        self.max_run_rows = max(1, budget_bytes // per_image) if per_image else 2**31
        return self.max_run_rows

    def time_batch(self, batch_size: int, runs: int = 3) -> float:
        """Seconds one run of ``batch_size`` images takes now, the best of ``runs`` (outside the
        inference metrics): the service time before any request has been measured."""
        x = np.zeros((batch_size, *self.input_shape), dtype=np.float32)
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            self._infer(self.session, x)
            best = min(best, time.perf_counter() - start)
        return best

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,), runs: int = 2) -> float:
        """Run each batch size ``runs`` times so the first user does not pay for allocation.

        Returns the seconds it took. Uses ``session.run`` directly to keep warm-up out of the
        inference histogram.
        """
        start = time.perf_counter()
        sessions = [s for s in (self.session, self.lone_session) if s is not None]
        for n in sorted(set(batch_sizes)):
            x = np.zeros((n, *self.input_shape), dtype=np.float32)
            for session in sessions:
                # A lone request is one image: its session needs no warm-up at larger batches.
                if session is self.lone_session and n > 1:
                    continue
                for _ in range(runs):
                    out = self._infer(session, x)
                    if out.shape != (n, self.spec.num_classes):
                        raise ModelLoadError(
                            f"{self.path}: warm-up output shape {out.shape}, expected "
                            f"({n}, {self.spec.num_classes})"
                        )
        return time.perf_counter() - start
