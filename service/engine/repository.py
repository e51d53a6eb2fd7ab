"""The serving state of one process: which models and versions are loaded, and the one place
every protocol asks for one (the seam's other half, beside the :class:`Classifier`).

A :class:`ModelRepository` answers live, ready, draining, :meth:`~ModelRepository.lease` (model
lookup by name and version) and :meth:`~ModelRepository.infer`; it loads, swaps and unloads
versions as the repository on disk, the load API or polling ask. The rules users of Triton's
model repository expect, and that its users' complaints are about:

- A new version is loaded, checked against its own metadata, held to the contract of the
  version it replaces (:meth:`sepconv.spec.ModelSpec.contract`) and warmed up beside the old one
  before it takes traffic; a file that is half-written, corrupt, or changes the contract never
  replaces a working version: the load fails with its reason in the index, a log line and a
  metric, and the old version keeps serving.
- Requests hold a lease on the version they were routed to, from lookup to answer; a version
  being unloaded takes no new request, finishes the ones it holds, then releases its session
  (and its memory: the arena is off by default and freed pages go back to the system).
- The server is ready only while at least one model is loaded, and not draining.

Every version has its own batcher, and they share the process's lanes (:mod:`.lanes`), so
admission control sees the work of every model on the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

import numpy as np

from sepconv.spec import ModelSpec, SpecError, read_spec
from service.engine.classifier import Classifier, Inputs
from service.engine.context import RequestContext
from service.engine.fleet import Fleet, Outcome, merge
from service.engine.lanes import BusyBoard, Lanes
from service.engine.layout import (
    Fingerprint,
    LayoutError,
    ModelFolder,
    RepositorySource,
    SingleModelSource,
    VersionFile,
    version_key,
)
from service.engine.loader import Loader, Served
from service.engine.observer import (
    NULL_OBSERVER,
    NULL_REPOSITORY_OBSERVER,
    EngineObserver,
    RepositoryObserver,
)
from service.engine.runtime import ModelLoadError, find_model_file
from service.errors import ModelLoadFailed, NotFound, NotReady, Overloaded, ServiceError
from service.settings import Settings

log = logging.getLogger("service.repository")

#: How long a load or unload request waits for every worker process to apply it.
FLEET_TIMEOUT_S = 120.0
#: How often a worker looks for load and unload requests taken by the others.
FOLLOW_INTERVAL_S = 0.1
I = TypeVar("I", bound=Inputs)  # noqa: E741 (the protocol's parsed request)


class State(StrEnum):
    """A version's state, Triton's names (``/v2/repository/index``)."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: State
    reason: str = ""

    def document(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "state": str(self.state),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Answer(Generic[I]):
    """What :meth:`ModelRepository.infer` gives a protocol to encode."""

    spec: ModelSpec
    inputs: I
    probs: np.ndarray


def source_from(settings: Settings) -> RepositorySource | SingleModelSource:
    """The repository the settings name: a folder of models, or one file as a repository of
    one model. Raises :class:`ModelLoadError` when the single file cannot be read."""
    if settings.model_repository is not None:
        return RepositorySource(settings.model_repository)
    path = find_model_file(settings.model_path)
    try:
        spec = read_spec(path)
    except (OSError, SpecError) as exc:
        raise ModelLoadError(f"cannot serve {path}: {exc}") from exc
    return SingleModelSource(path, settings.model_name or spec.name, spec.version)


class ModelRepository:
    """Loaded models by name and version; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        observer_for: Callable[[str, str], EngineObserver] = lambda name, version: NULL_OBSERVER,
        events: RepositoryObserver = NULL_REPOSITORY_OBSERVER,
    ) -> None:
        self.settings = settings
        #: Read at :meth:`start`; until then nothing is loaded and nothing is ready.
        self.source: RepositorySource | SingleModelSource | None = None
        self.observer_for = observer_for
        self.events = events
        self.lanes = Lanes(settings.lanes, inference_nice=settings.inference_nice)
        self._served: dict[str, dict[str, Served]] = {}
        #: Versions that are loading, unloading or failed, and models known but not loaded.
        self._status: dict[tuple[str, str], IndexEntry] = {}
        self._known: dict[str, ModelFolder] = {}
        #: Models unloaded through the API: polling leaves them unloaded until loaded again.
        self._unloaded: set[str] = set()
        #: The fingerprint seen at the previous poll (a file must hold still to be loaded) and
        #: the last one that failed (not retried until it changes).
        self._seen: dict[tuple[str, str], Fingerprint] = {}
        self._failed: dict[tuple[str, str], Fingerprint] = {}
        self._lock = asyncio.Lock()
        self._draining = False
        #: From the end of :meth:`start` to the start of :meth:`stop`: before, every model
        #: request answers 503 (loading), not 404.
        self.started = False
        self._loader = Loader(settings, self.lanes, observer_for)
        self._poller: asyncio.Task | None = None
        #: Polling passes begun (tests wait on it instead of sleeping).
        self.polls = 0
        #: Several worker processes: each follows the others' load and unload requests.
        self.fleet = (
            Fleet(settings.control_dir, settings.resolved_workers)
            if settings.control_dir is not None
            else None
        )
        self._follower: asyncio.Task | None = None
        self._follow_lock = asyncio.Lock()

    # --- what every protocol asks -----------------------------------------------------------

    @property
    def live(self) -> bool:
        return True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def ready(self) -> bool:
        """Ready for load balancers: at least one model loaded and warm, and not draining."""
        return self.started and not self._draining and any(self._served.values())

    def begin_drain(self) -> None:
        """Readiness says no from now on; requests are still served (service.drain)."""
        self._draining = True

    def default_name(self) -> str | None:
        """The model ``/v1`` serves when the request names none: ``SEPCONV_DEFAULT_MODEL``,
        else the alphabetically first model loaded."""
        if self.settings.default_model:
            return self.settings.default_model
        loaded = sorted(name for name, versions in self._served.items() if versions)
        return loaded[0] if loaded else None

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` loaded now, ascending."""
        return sorted(self._served.get(name, {}), key=version_key)

    def loaded(self) -> list[Classifier]:
        """Every version loaded now (for statistics of all models)."""
        return [
            served.classifier
            for _, versions in sorted(self._served.items())
            for _, served in sorted(versions.items(), key=lambda item: version_key(item[0]))
        ]

    def lookup(self, name: str | None = None, version: str | None = None) -> Served:
        """The version a request for ``name`` (default: :meth:`default_name`) and ``version``
        (default: the highest loaded) goes to; :class:`NotReady` while it is loading or when
        nothing is loaded, :class:`NotFound` when it is not served."""
        if not self.started:
            raise NotReady()
        if name is None:
            name = self.default_name()
            if name is None:
                raise NotReady()
        versions = self._served.get(name)
        if not versions:
            raise self._not_serving(name)
        if version is None:
            return versions[max(versions, key=version_key)]
        served = versions.get(version)
        if served is None:
            status = self._status.get((name, version))
            if status is not None and status.state == State.LOADING:
                raise NotReady(f"model {name!r} version {version} is loading")
            have = ", ".join(sorted(versions, key=version_key))
            raise NotFound(f"model {name!r} has no version {version!r}; it serves {have}")
        return served

    def _not_serving(self, name: str) -> Exception:
        statuses = [e for (n, _), e in self._status.items() if n == name]
        if any(e.state == State.LOADING for e in statuses):
            return NotReady(f"model {name!r} is loading")
        if name in self._known or statuses:
            reasons = "; ".join(f"{e.version or '-'}: {e.reason}" for e in statuses if e.reason)
            return NotFound(
                f"model {name!r} is not loaded"
                + (f" ({reasons})" if reasons else "")
                + f"; load it with POST /v2/repository/models/{name}/load"
            )
        serving = ", ".join(repr(n) for n in sorted(n for n, v in self._served.items() if v))
        return NotFound(f"unknown model {name!r}; this server serves {serving or 'no model'}")

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Loaded and warm. Draining does not change it: the model still answers; the server's
        readiness (:attr:`ready`) is what tells load balancers to stop sending."""
        try:
            self.lookup(name, version)
        except (NotFound, NotReady):
            return False
        return True

    @contextlib.contextmanager
    def lease(self, name: str | None = None, version: str | None = None) -> Iterator[Classifier]:
        """The classifier for ``name``/``version``, kept loaded until the block ends."""
        served = self.lookup(name, version)
        served.leases += 1
        try:
            yield served.classifier
        finally:
            served.leases -= 1
            if served.leases == 0 and served.retiring:
                served.idle.set()

    async def infer(
        self,
        parse: Callable[[ModelSpec], Awaitable[I]],
        ctx: RequestContext,
        name: str | None = None,
        version: str | None = None,
    ) -> Answer[I]:
        """One inference request, whatever its protocol: look the model up, refuse what the
        latency budget cannot serve (before the body is read), ``parse`` the request against
        the model's spec, classify."""
        with self.lease(name, version) as classifier:
            await classifier.admit()
            inputs = await parse(classifier.spec)
            probs = await classifier.classify(inputs, ctx)
            return Answer(classifier.spec, inputs, probs)

    async def admission_refusal(
        self, name: str | None = None, version: str | None = None, images: int = 1
    ) -> Overloaded | None:
        """The refusal a request for ``images`` of ``name``/``version`` gets from admission
        control now, once it has waited its turn (refusal pacing); None when it would be
        admitted, or when the model is not served (the request's own path answers that, 404 or
        503). For a layer that answers refusals before it parses anything: :meth:`infer` still
        admits every request it is given."""
        try:
            with self.lease(name, version) as classifier:
                await classifier.admit(images)
        except Overloaded as exc:
            return exc
        except (NotFound, NotReady):
            pass
        return None

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model and version with its state (Triton's index); with several worker
        processes, merged over all of them: READY once every worker has it."""
        if self.fleet is None:
            ordered = self._local_index()
        else:
            self._publish()
            ordered = sorted(
                (
                    IndexEntry(e["name"], e["version"], State(e["state"]), e["reason"])
                    for e in merge(self.fleet.states(), self.fleet.workers)
                ),
                key=lambda e: (e.name, version_key(e.version)),
            )
        if ready_only:
            return [e for e in ordered if e.state == State.READY]
        return ordered

    def _local_index(self) -> list[IndexEntry]:
        entries: dict[tuple[str, str], IndexEntry] = dict(self._status)
        for name, versions in self._served.items():
            for version in versions:
                # A version being unloaded has left _served; its UNLOADING entry is in _status.
                entries[(name, version)] = IndexEntry(name, version, State.READY)
        for name in self._known:
            if not any(n == name for n, _ in entries):
                entries[(name, "")] = IndexEntry(name, "", State.UNAVAILABLE, "unloaded")
        return sorted(entries.values(), key=lambda e: (e.name, version_key(e.version)))

    def _publish(self) -> None:
        if self.fleet is not None:
            self.fleet.publish(e.document() for e in self._local_index())

    # --- loading and unloading ----------------------------------------------------------------

    async def start(self) -> None:
        """Load every model the repository holds. With one model file (``SEPCONV_MODEL_PATH``)
        a failure stops start-up; a repository starts anyway, not ready until a model loads."""
        self.source = source_from(self.settings)
        if self.fleet is not None and self.settings.worker_index is not None:
            # The other workers' flags: a request alone on the machine may use every core.
            self.lanes.board = BusyBoard(
                self.fleet.folder / "busy", self.settings.worker_index, self.fleet.workers
            )
        async with self._lock:
            folders = await asyncio.to_thread(self._scan)
            failures = []
            for folder in folders.values():
                failures += await self._apply(folder)
        if failures and isinstance(self.source, SingleModelSource):
            await self.stop()
            raise ModelLoadError("; ".join(failures))
        self.started = True
        loop = asyncio.get_running_loop()
        if self.fleet is not None:
            self._publish()
            self._follower = loop.create_task(self._follow_forever(), name="sepconv-follow")
        if self.settings.repository_poll_s > 0:
            self._poller = loop.create_task(
                self._poll_forever(self.settings.repository_poll_s), name="sepconv-poll"
            )

    async def load(self, name: str) -> None:
        """Triton's load: read ``name``'s folder again and serve what its version policy
        selects; new versions swap in, versions it no longer selects are unloaded. Raises
        :class:`ModelLoadFailed` with every version's reason if any failed. With several
        worker processes, returns once every one of them has applied it."""
        await self._control("load", name)

    async def unload(self, name: str) -> None:
        """Triton's unload: every version of ``name`` finishes its requests and is released
        (in every worker process)."""
        await self._control("unload", name)

    async def _control(self, action: str, name: str) -> None:
        apply = self._load_here if action == "load" else self._unload_here
        if self.fleet is None:
            await apply(name)
            return
        seq = self.fleet.submit(action, name)
        await self._follow()
        try:
            outcomes = await self.fleet.wait_applied(seq, FLEET_TIMEOUT_S)
        except TimeoutError as exc:
            raise ModelLoadFailed(f"{action} of {name!r} is not done everywhere: {exc}") from exc
        failed = sorted({o for o in outcomes if o.status != 200}, key=lambda o: o.status)
        if failed:
            detail = "; ".join(o.detail for o in failed)
            if failed[0].status == 404:
                raise NotFound(detail)
            raise ModelLoadFailed(detail)

    async def _follow(self) -> None:
        """Apply the load and unload requests any worker took since the last call."""
        async with self._follow_lock:
            for command in self.fleet.new_commands():
                apply = self._load_here if command.action == "load" else self._unload_here
                try:
                    await apply(command.model)
                    outcome = Outcome(200)
                except ServiceError as exc:
                    outcome = Outcome(exc.status_code, exc.detail)
                self.fleet.record(command.seq, outcome)
                self._publish()

    async def _follow_forever(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            try:
                await self._follow()
            except Exception:  # a bad line must not end following
                log.exception("following the other workers' load requests failed")

    async def _load_here(self, name: str) -> None:
        async with self._lock:
            self._unloaded.discard(name)
            folders = await asyncio.to_thread(self._scan)
            folder = folders.get(name)
            if folder is None:
                raise NotFound(f"no model {name!r} in the repository ({self.source.where(name)})")
            failures = await self._apply(folder, retry_failed=True)
        if failures:
            raise ModelLoadFailed(f"failed to load {name!r}: " + "; ".join(failures))

    async def _unload_here(self, name: str) -> None:
        async with self._lock:
            if name not in self._served and name not in self._known:
                raise NotFound(f"unknown model {name!r}")
            self._unloaded.add(name)
            for key in [k for k in self._status if k[0] == name]:
                del self._status[key]
            versions = self._served.pop(name, {})
            await asyncio.gather(*(self._retire(s) for s in versions.values()))

    async def poll(self) -> None:
        """One polling pass: new and changed versions of every model (each file only once it
        held still since the previous pass), removed ones unloaded."""
        async with self._lock:
            self.polls += 1
            folders = await asyncio.to_thread(self._scan)
            for name in set(self._served) - set(folders):
                log.info("model %s left the repository: unloading it", name)
                versions = self._served.pop(name)
                await asyncio.gather(*(self._retire(s) for s in versions.values()))
            for name, folder in folders.items():
                if name not in self._unloaded:
                    await self._apply(folder, settle=True)

    async def stop(self) -> None:
        """Stop polling, fail what is still queued, release every session."""
        self.started = False
        for task in (self._poller, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for versions in self._served.values():
            for served in versions.values():
                await served.classifier.batcher.stop()
                served.classifier.close()
        self._served.clear()
        await self.lanes.close()
        self._loader.close()

    # --- internals ----------------------------------------------------------------------------

    def _scan(self) -> dict[str, ModelFolder]:
        if self.source is None:
            raise NotReady()
        try:
            folders = self.source.scan()
        except LayoutError as exc:
            log.error("%s", exc)
            return {}
        self._known = folders
        return folders

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:  # one bad pass must not end polling
                log.exception("polling the model repository failed")

    async def _apply(
        self, folder: ModelFolder, *, retry_failed: bool = False, settle: bool = False
    ) -> list[str]:
        """Serve what ``folder``'s policy selects; the reasons of the versions that failed."""
        name = folder.name
        if folder.error:
            self._fail(name, "", folder.error)
            return [folder.error]
        self._status.pop((name, ""), None)
        served = self._served.setdefault(name, {})
        failures: list[str] = []
        failed_wanted = 0
        for vf in folder.versions:
            key = (name, vf.version)
            current = served.get(vf.version)
            if current is not None and current.fingerprint == vf.fingerprint:
                continue
            if settle and self._seen.get(key) != vf.fingerprint:
                # Still being written, or just arrived: load it once it held still for a pass.
                self._seen[key] = vf.fingerprint
                if current is None:
                    failed_wanted += 1
                continue
            if not retry_failed and self._failed.get(key) == vf.fingerprint:
                failed_wanted += current is None
                continue
            self._seen[key] = vf.fingerprint
            try:
                new = await self._load_version(name, vf)
            except ModelLoadFailed as exc:
                failures.append(exc.detail)
                failed_wanted += current is None
                continue
            served[vf.version] = new
            self._publish()
            if current is not None:
                await self._retire(current)
        wanted = {vf.version for vf in folder.versions}
        for key in [k for k, e in self._status.items() if k[0] == name and k[1] not in wanted]:
            if self._status[key].state == State.UNAVAILABLE:
                del self._status[key]  # a failure of a version the policy no longer selects
        # A version the policy no longer selects is unloaded, unless it stands in for a
        # selected one that failed to load: a bad file never takes down a working version.
        unwanted = sorted((v for v in served if v not in wanted), key=version_key, reverse=True)
        for version in unwanted[failed_wanted:]:
            await self._retire(served.pop(version))
        if not served:
            del self._served[name]
        return failures

    async def _load_version(self, name: str, vf: VersionFile) -> Served:
        key = (name, vf.version)
        self._status[key] = IndexEntry(name, vf.version, State.LOADING)
        self._publish()
        versions = self._served.get(name)
        newest = versions[max(versions, key=version_key)] if versions else None
        started = time.monotonic()
        try:
            served = await self._loader.load(name, vf, replaces=newest)
        except ModelLoadError as exc:
            reason = str(exc)
            self._fail(name, vf.version, reason)
            self._failed[key] = vf.fingerprint
            raise ModelLoadFailed(f"version {vf.version}: {reason}") from exc
        del self._status[key]
        self._failed.pop(key, None)
        runtime = served.classifier.runtime
        seconds = time.monotonic() - started
        self.events.model_loaded(name, vf.version, seconds, runtime)
        log.info(
            "model %s version %s loaded and warm in %.2f s (%s, %dpx %s) on %s",
            name,
            vf.version,
            seconds,
            runtime.spec.precision,
            runtime.spec.input_size,
            runtime.spec.color_mode,
            runtime.providers,
        )
        return served

    def _fail(self, name: str, version: str, reason: str) -> None:
        self._status[(name, version)] = IndexEntry(name, version, State.UNAVAILABLE, reason)
        self._publish()
        self.events.model_load_failed(name, version, reason)
        log.error("cannot load model %s version %s: %s", name, version or "-", reason)

    async def _retire(self, served: Served) -> None:
        """Take no new request, finish the ones held, then release the session."""
        served.retiring = True
        key = (served.name, served.version)
        self._status[key] = IndexEntry(served.name, served.version, State.UNLOADING)
        self._publish()
        await self._loader.unload(served)
        if self._status.get(key) is not None and self._status[key].state == State.UNLOADING:
            del self._status[key]
        self._publish()
        self.events.model_unloaded(served.name, served.version)
        log.info("model %s version %s unloaded", served.name, served.version)
