"""Bringing one model version up and taking it down, the work under the repository's decisions.

Up: the ONNX Runtime session is created, checked against the file's own metadata and warmed up
on a loader thread of low priority, so the versions already serving keep their cores; the new
version must keep the contract of the version it replaces; then its batcher starts on the
process's shared lanes. Down: the version takes no new request (the repository stopped routing
to it), the requests that hold it finish, its batcher stops, its session is released, and the
freed memory goes back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sepconv.preprocess import normalize
from service.engine.batcher import Batcher
from service.engine.classifier import Classifier
from service.engine.lanes import Lanes, lower_thread_priority
from service.engine.layout import Fingerprint, VersionFile
from service.engine.observer import NULL_OBSERVER, EngineObserver
from service.engine.runtime import ModelLoadError, ModelRuntime
from service.settings import Settings

log = logging.getLogger("service.repository")

#: Nice value of the thread that loads and warms up new versions: serving goes first.
LOAD_NICE = 10


@dataclass(eq=False)
class Served:
    """A loaded version and the requests that hold it (see ``ModelRepository.lease``)."""

    name: str
    version: str
    classifier: Classifier
    fingerprint: Fingerprint
    leases: int = 0
    retiring: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)


def open_runtime(
    settings: Settings,
    path,
    *,
    name: str | None = None,
    version: str | None = None,
    observer: EngineObserver = NULL_OBSERVER,
) -> ModelRuntime:
    """A session for ``path`` with the ONNX Runtime options the settings give (what the server
    runs; the benchmark's raw ORT baseline uses the same)."""
    return ModelRuntime(
        path,
        provider=settings.provider,
        intra_op_threads=settings.resolved_intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.ort_spinning,
        name=name,
        version=version,
        memory_arena=settings.ort_memory_arena,
        lone_threads=settings.resolved_lone_request_threads,
        observer=observer,
    )


def release_freed_memory() -> None:
    """Hand pages freed by an unloaded model back to the system (glibc keeps them otherwise,
    and RSS would grow with every load and unload)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _inherit_timings(new: Batcher, old: Batcher) -> None:
    """Start a new version's time per image from the one it replaces. Timed on the loader's
    low-priority thread while the old version serves, a run can take many times its real
    cost (a 224 px version under c=32 load drew 161 refusals in 10 swaps from admission
    control reading such a figure); the version it replaces keeps the same contract, and
    its recent figures are measured under the load it will meet. Its own runs correct the
    estimate within a few batches."""
    if old.image_seconds is not None:
        new.image_seconds = old.image_seconds
    if old.nominal_image_seconds is not None:
        new.nominal_image_seconds = old.nominal_image_seconds
    if old.single_image_s is not None and new.single_image_s is not None:
        new.single_image_s = min(new.single_image_s, old.single_image_s)


class Loader:
    def __init__(
        self,
        settings: Settings,
        lanes: Lanes,
        observer_for: Callable[[str, str], EngineObserver],
    ) -> None:
        self.settings = settings
        self.lanes = lanes
        self.observer_for = observer_for
        self._thread = ThreadPoolExecutor(
            1,
            thread_name_prefix="sepconv-load",
            initializer=lower_thread_priority,
            initargs=(LOAD_NICE,),
        )

    async def load(self, name: str, vf: VersionFile, *, replaces: Served | None) -> Served:
        """``vf`` loaded, checked, warm and batching; :class:`ModelLoadError` says why not.
        ``replaces``: the newest version serving now, whose contract the new one must keep."""
        runtime, largest_run, single_s = await asyncio.get_running_loop().run_in_executor(
            self._thread, self._session, name, vf
        )
        if replaces is not None:
            changes = replaces.classifier.spec.contract_changes(runtime.spec)
            if changes:
                runtime.close()
                raise ModelLoadError(
                    f"its contract differs from version {replaces.version}'s ("
                    + "; ".join(changes)
                    + "); serve it under another model name, or unload the model first"
                )
        # Only a version that loads gets its series: a failed load shows in the load metrics
        # and the index, not as a model with empty engine series.
        observer = runtime.observer = self.observer_for(name, vf.version)
        runtime.alone = self.lanes.alone
        classifier = self._classifier(runtime, observer, largest_run, single_s)
        if replaces is not None:
            _inherit_timings(classifier.batcher, replaces.classifier.batcher)
        classifier.batcher.start()
        # What the warm-up's largest batches took is free again: back to the system with it.
        await asyncio.to_thread(release_freed_memory)
        return Served(name, vf.version, classifier, vf.fingerprint)

    def _session(self, name: str, vf: VersionFile) -> tuple[ModelRuntime, tuple[int, float], float]:
        """On the loader thread: the checked, warm session; the seconds its largest run takes
        now, with its images; and the seconds a single image takes."""
        s = self.settings
        runtime = open_runtime(s, vf.path, name=name, version=vf.version)
        try:
            if s.run_memory_mb:
                runtime.limit_run_memory(s.run_memory_mb * 2**20)
            # The shapes ORT will see: one image, the largest run, and the last piece of a
            # full batch; warming a whole batch of pieces would only repeat them (and a load
            # under traffic competes for the cores with the versions serving).
            rows = min(s.max_batch_size, runtime.max_run_rows)
            runtime.warm_up((1, rows, s.max_batch_size % rows or rows), runs=s.warmup_runs)
            # Admission control predicts waits from the measured time per image; until
            # requests have been measured, the largest run timed now stands in. The
            # single-image time decides whether a lone request may run on the event loop.
            return runtime, (rows, runtime.time_batch(rows)), runtime.time_batch(1)
        except ModelLoadError:
            runtime.close()
            raise
        except Exception as exc:  # ORT's own error types, from a graph that runs wrong
            runtime.close()
            raise ModelLoadError(f"{vf.path} fails its warm-up run: {exc}") from exc

    def _classifier(
        self,
        runtime: ModelRuntime,
        observer: EngineObserver,
        largest_run: tuple[int, float],
        single_s: float,
    ) -> Classifier:
        s = self.settings
        batcher = Batcher(
            runtime.run,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue_size=s.max_queue_size,
            timeout_s=s.request_timeout_s,
            item_shape=runtime.input_shape,
            normalize=functools.partial(normalize, spec=runtime.spec),
            lanes=self.lanes,
            inline_max_s=s.inline_inference_max_ms / 1000,
            observer=observer,
        )
        batcher.record_batch(*largest_run)
        batcher.single_image_s = single_s
        return Classifier(
            runtime,
            batcher,
            max_pixels=s.max_pixels,
            inline_decode_max_pixels=s.inline_decode_max_pixels,
            max_queue_delay_s=s.max_queue_delay_ms / 1000,
            refusal_rate_factor=s.refusal_rate_factor,
            observer=observer,
        )

    async def unload(self, served: Served) -> None:
        """Wait for the requests that hold ``served``, then release it."""
        if served.leases:
            # Bounded: no request waits longer than its timeout for an answer anyway.
            grace = self.settings.request_timeout_s + self.settings.max_queue_delay_ms / 1000
            try:
                await asyncio.wait_for(served.idle.wait(), grace)
            except TimeoutError:
                log.warning(
                    "model %s version %s still had %d requests after %.0f s; stopping it",
                    served.name,
                    served.version,
                    served.leases,
                    grace,
                )
        await served.classifier.batcher.stop()
        served.classifier.close()
        await asyncio.to_thread(release_freed_memory)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
