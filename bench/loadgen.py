"""A cheap HTTP/1.1 load generator: raw keep-alive connections over asyncio streams.

The server and this client share the same few cores, so every microsecond the client spends is
taken from the server. A request here is one pre-built ``bytes`` write and a minimal response
parse (status line, ``Content-Length`` or chunked body), no HTTP library and no per-request
object churn beyond a latency float; :attr:`RunResult.client_cpu_per_request_us` reports what it
really cost.

Two ways to apply load:

- **closed loop** (:func:`closed_loop`): ``concurrency`` connections, each sending its next
  request as soon as the previous answer arrives. Measures capacity; latency is what one user
  waiting on each answer sees.
- **open loop** (:func:`open_loop`): requests are *scheduled* at a target rate (Poisson or fixed
  interval) independently of answers, and latency is measured from the scheduled send time, so a
  stalled server is charged for the requests it delayed (no coordinated omission).

Both stop at whichever comes first of a duration and a request count: runs are always bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Cap on one response body, so a misbehaving server cannot make the client buffer without end.
MAX_BODY = 16 * 1024 * 1024
#: An open loop does not reuse a connection idle for longer than this: servers close idle
#: keep-alive connections (uvicorn after 5 s), and a request written onto one just as it closes
#: fails with a reset. A 30-minute overload soak counted 1,007 such "connection" errors.
MAX_IDLE_REUSE_S = 4.0
#: Statuses that mean "not now": load shedding and not-ready.
REFUSALS = frozenset({429, 503})


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 we understand."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as ``numpy.percentile(..., method="linear")``; NaN for no data.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Target:
    """One endpoint to hit with a fixed set of request bodies (used round-robin)."""

    host: str
    port: int
    path: str
    bodies: tuple[bytes, ...]
    content_type: str = "image/png"
    extra_headers: tuple[tuple[str, str], ...] = ()

    def requests(self) -> list[bytes]:
        """Every request fully serialised once, up front: sending is a single write."""
        out = []
        for body in self.bodies:
            head = [
                f"POST {self.path} HTTP/1.1",
                f"Host: {self.host}:{self.port}",
                f"Content-Type: {self.content_type}",
                f"Content-Length: {len(body)}",
                *(f"{k}: {v}" for k, v in self.extra_headers),
            ]
            out.append(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        return out


@dataclass
class RunResult:
    """What one bounded run measured. Latencies are in seconds, for successful requests only."""

    mode: str
    concurrency: int
    target_rate: float | None
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    #: Latencies of answers that refused the request (429, 503): how fast the server says no.
    refused_latencies: list[float] = field(default_factory=list)
    #: The same refusals timed from the moment the request was written, not from its schedule:
    #: what the server took, without the client's own lag at sending (open loop only).
    refused_wire_latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    client_cpu_s: float = 0.0
    late_sends: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def total(self) -> int:
        return self.ok + self.error_count

    @property
    def throughput(self) -> float:
        """Successful requests per second of the measured window."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000.0

    @property
    def client_cpu_per_request_us(self) -> float:
        return self.client_cpu_s / self.total * 1e6 if self.total else math.nan

    def summary(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "target_rate": self.target_rate,
            "duration_s": round(self.duration_s, 3),
            "requests": self.total,
            "ok": self.ok,
            "errors": self.error_count,
            "error_kinds": dict(self.errors),
            "req_per_s": round(self.throughput, 1),
            "p50_ms": round(self.latency_ms(50), 3),
            "p90_ms": round(self.latency_ms(90), 3),
            "p99_ms": round(self.latency_ms(99), 3),
            "max_ms": round(max(self.latencies, default=math.nan) * 1000.0, 3),
            "client_cpu_us_per_req": round(self.client_cpu_per_request_us, 1),
            "late_sends": self.late_sends,
            "refused": len(self.refused_latencies),
            "refused_p99_ms": round(percentile(self.refused_latencies, 99) * 1000.0, 3),
            "refused_wire_p99_ms": round(percentile(self.refused_wire_latencies, 99) * 1000.0, 3),
        }


class Connection:
    """One keep-alive HTTP/1.1 connection that sends pre-built requests and reads answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_BODY)
        return cls(reader, writer)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def request(self, raw: bytes) -> tuple[int, bool]:
        """Send one request; return (status, keep_alive). The body is read and dropped."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, header_block = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {status_line[:60]!r}")
        status = int(parts[1])
        length = None
        chunked = False
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep_alive = value.strip().lower() != b"close"
        if chunked:
            await self._read_chunked()
        elif length is not None:
            if length > MAX_BODY:
                raise ProtocolError(f"response body of {length} bytes is over the limit")
            await self.reader.readexactly(length)
        else:
            # No length and not chunked: the body runs to the end of the connection.
            await self.reader.read(MAX_BODY)
            keep_alive = False
        return status, keep_alive

    async def _read_chunked(self) -> None:
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers expected
                return
            await self.reader.readexactly(size + 2)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionError | asyncio.IncompleteReadError):
        return "connection"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, ProtocolError | ValueError):
        return "protocol"
    return type(exc).__name__


async def _one(
    conn: Connection | None, target: Target, raw: bytes, timeout: float
) -> tuple[Connection | None, int | None, str | None]:
    """Send one request on ``conn`` (opened if None); the connection is None when it broke."""
    try:
        # asyncio.timeout is a timer handle; wait_for would wrap every request in a new Task.
        async with asyncio.timeout(timeout):
            if conn is None:
                conn = await Connection.open(target.host, target.port)
            status, keep_alive = await conn.request(raw)
    except Exception as exc:  # every failure is counted, none ends the run
        if conn is not None:
            conn.close()
        return None, None, _error_kind(exc)
    if not keep_alive:
        conn.close()
        conn = None
    return conn, status, None


def _record(result: RunResult, status: int | None, error: str | None, latency: float) -> None:
    if error is not None:
        result.errors[error] += 1
    elif status is not None and 200 <= status < 300:
        result.latencies.append(latency)
    else:
        result.errors[f"http_{status}"] += 1
        if status in REFUSALS:
            result.refused_latencies.append(latency)


async def closed_loop(
    target: Target,
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int | None = None,
    warmup_s: float = 0.0,
    timeout_s: float = 30.0,
    stop: threading.Event | None = None,
) -> RunResult:
    """``concurrency`` connections, each sending back to back for ``duration_s`` (or until
    ``stop`` is set, from another thread).

    Requests that *start* during ``warmup_s`` are sent but not counted.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    raws = target.requests()
    result = RunResult("closed", concurrency, None, 0.0)
    start = time.perf_counter()
    measure_from = start + warmup_s
    deadline = measure_from + duration_s
    budget = [max_requests if max_requests is not None else math.inf]

    async def worker(index: int) -> None:
        conn: Connection | None = None
        i = index
        while True:
            now = time.perf_counter()
            if now >= deadline or budget[0] <= 0 or (stop is not None and stop.is_set()):
                break
            counted = now >= measure_from
            if counted:
                budget[0] -= 1
            conn, status, error = await _one(conn, target, raws[i % len(raws)], timeout_s)
            i += concurrency
            if counted:
                _record(result, status, error, time.perf_counter() - now)
            if error == "connection":
                await asyncio.sleep(0.01)  # do not spin on a refusing server
        if conn is not None:
            conn.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    result.client_cpu_s = time.process_time() - cpu0
    result.duration_s = max(time.perf_counter(), measure_from) - measure_from
    return result


def arrival_times(rate: float, duration_s: float, *, poisson: bool, seed: int = 0) -> list[float]:
    """Send offsets (seconds from the start) at ``rate`` per second for ``duration_s``."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        if t >= duration_s:
            return times
        times.append(t)


async def open_loop(
    target: Target,
    *,
    rate: float,
    duration_s: float,
    max_requests: int | None = None,
    poisson: bool = True,
    max_connections: int = 256,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> RunResult:
    """Requests scheduled at ``rate``/s; latency counts from each *scheduled* send time.

    At most ``max_connections`` requests are in flight; a scheduled request that finds none
    free waits for one, and that wait is part of its latency.
    """
    raws = target.requests()
    schedule = arrival_times(rate, duration_s, poisson=poisson, seed=seed)
    if max_requests is not None:
        schedule = schedule[:max_requests]
    result = RunResult("open", max_connections, rate, 0.0)
    idle: list[tuple[Connection, float]] = []  # (connection, idle since)
    slots = asyncio.Semaphore(max_connections)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def send(index: int, scheduled: float) -> None:
        async with slots:
            conn = None
            while idle and conn is None:
                conn, since = idle.pop()
                if time.perf_counter() - since > MAX_IDLE_REUSE_S:
                    conn.close()  # the server may be closing it right now
                    conn = None
            sent = time.perf_counter()
            conn, status, error = await _one(conn, target, raws[index % len(raws)], timeout_s)
            done = time.perf_counter()
            _record(result, status, error, done - scheduled)
            if error is None and status in REFUSALS:
                result.refused_wire_latencies.append(done - sent)
            if conn is not None:
                idle.append((conn, time.perf_counter()))

    cpu0 = time.process_time()
    start = time.perf_counter()
    for index, offset in enumerate(schedule):
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            result.late_sends += 1  # the client itself fell behind by more than 1 ms
        task = loop.create_task(send(index, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    result.duration_s = max(time.perf_counter() - start, schedule[-1] if schedule else 0.0)
    # Throughput of an open loop is the offered rate when the server keeps up; the window is
    # the schedule, stretched by however long the last answers took.
    result.client_cpu_s = time.process_time() - cpu0
    for conn, _ in idle:
        conn.close()
    return result


def run(coro):
    """Run a load coroutine on uvloop when installed (cheaper per request), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
