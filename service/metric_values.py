"""Metric values for several worker processes, written to the shared files in batches.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, one directory shared by the workers)
prometheus_client writes every ``inc``, ``set`` and ``observe`` straight into a memory-mapped
file, under a lock, after checking the process id: about 1.1 µs per counter increment and
2.1 µs per histogram observation here, against 0.4 µs in memory. A request made about twenty such
writes (HTTP metrics, decode, batch, model run, the per-request statistics): 24 µs of a 28 px
request's CPU, measured in one process with the writes on and off in alternating rounds.

:func:`install` makes every metric value created afterwards keep its increments (and its last
``set``) in memory and write them to the file in one pass (:func:`flush`): every
:data:`FLUSH_INTERVAL_S` from a background thread, before this process renders ``/metrics`` or
the statistics (so its own answers are always current), and at exit. Another worker's numbers
reach ``/metrics`` at most :data:`FLUSH_INTERVAL_S` late; Prometheus scrapes every few seconds.
In one process (no ``PROMETHEUS_MULTIPROC_DIR``) values stay prometheus_client's in-memory ones.

The values subclass prometheus_client's own multiprocess value class (its ``inc``/``set``/``get``
interface, the same files, locks and fork check), so the files and their readers are unchanged.
"""

from __future__ import annotations

import atexit
import threading

from prometheus_client import values

#: Longest an increment waits in memory before it reaches the shared file.
FLUSH_INTERVAL_S = 0.25

_lock = threading.Lock()
_dirty: set = set()
_flusher: threading.Thread | None = None


def installed() -> bool:
    return getattr(values.ValueClass, "buffered", False)


def install() -> None:
    """Buffer every metric value created from now on, in multiprocess mode; idempotent, and a
    no-op in one process. Call it before the metrics are defined."""
    global _flusher
    base = values.ValueClass
    if installed() or not getattr(base, "_multiprocess", False):
        return

    class BufferedValue(base):  # type: ignore[misc, valid-type]
        buffered = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._pending = 0.0
            self._pending_set: tuple[float, float | None] | None = None

        def inc(self, amount: float) -> None:
            with _lock:
                self._pending += amount
                _dirty.add(self)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with _lock:
                self._pending = 0.0
                self._pending_set = (value, timestamp)
                _dirty.add(self)

        def get(self) -> float:
            flush()
            return super().get()

        def write(self) -> None:
            """Write what is pending (called by :func:`flush` only)."""
            with _lock:
                pending, self._pending = self._pending, 0.0
                latest, self._pending_set = self._pending_set, None
            if latest is not None:
                base.set(self, *latest)
            if pending:
                base.inc(self, pending)

    values.ValueClass = BufferedValue
    _flusher = threading.Thread(target=_flush_forever, name="sepconv-metrics", daemon=True)
    _flusher.start()
    atexit.register(flush)


def flush() -> None:
    """Write every pending increment and set to the shared files now."""
    with _lock:
        if not _dirty:
            return
        dirty = list(_dirty)
        _dirty.clear()
    for value in dirty:
        value.write()


def _flush_forever() -> None:
    stop = threading.Event()  # never set: the thread ends with the process (daemon)
    while not stop.wait(FLUSH_INTERVAL_S):
        flush()
