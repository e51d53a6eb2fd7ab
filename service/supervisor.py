"""Several worker processes, one listening socket each, balanced by the kernel (SO_REUSEPORT).

Why not uvicorn's own ``workers=N``: its workers share one listening socket, and under a burst of
new connections the first worker to wake accepts them all. Keep-alive connections then stay on
that worker for their whole life, so a benchmark or a load balancer that opens its pool at once
can leave every connection on one process and one core. Measured on 2 cores with the 28 px model
at concurrency 32: 2,568 req/s in one run, 4,577 in the next, depending on who won the accept
race; at 224 px, 127 vs 219 req/s. With ``SO_REUSEPORT`` every worker binds its own socket and
the kernel spreads new connections over them by a hash of the client address and port.

Failure policy is fail-fast: if one worker dies, the others are stopped and the supervisor
exits non-zero, so the orchestrator (compose ``restart:``, Kubernetes) restarts a whole, known
state instead of a server silently running at half capacity.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("service.supervisor")

#: prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: How long a worker gets after the graceful-shutdown window before it is killed.
KILL_AFTER_GRACE_S = 5.0


def reuseport_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, addr


def check_port_free(host: str, port: int) -> None:
    """Raise OSError if anything listens on host:port already.

    Binding *without* SO_REUSEPORT fails while any socket holds the port, including another
    SO_REUSEPORT group: without this check a second server started on the same port by the
    same user would silently join the first one's group and share its traffic.
    """
    family, addr = _address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT only
        probe.bind(addr)


def bind_reuseport(host: str, port: int) -> socket.socket:
    """A bound socket in host:port's SO_REUSEPORT group, not yet listening.

    The kernel only hands connections to listening members, and uvicorn calls ``listen()``
    after the app's start-up: a worker still loading its model gets no traffic.
    """
    family, addr = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, however it dies (Linux): a supervisor
    killed with SIGKILL cannot stop its workers, which would otherwise serve on, unsupervised,
    holding their port and memory."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(index: int, uvicorn_kwargs: dict[str, Any], parent: int) -> None:
    """Entry point of one spawned worker: its own socket, then a uvicorn server that drains on
    SIGTERM (service.drain) like a single-process one."""
    from service.server import serve
    from service.settings import Settings

    _die_with_parent(parent)

    # The service's logging (uvicorn applies the same ``log_config`` again when it starts).
    logging.config.dictConfig(uvicorn_kwargs["log_config"])
    host, port = uvicorn_kwargs["host"], uvicorn_kwargs["port"]
    try:
        sock = bind_reuseport(host, port)
    except OSError as exc:
        print(
            f"sepconv-serve worker {index}: cannot listen on {host}:{port}: {exc}", file=sys.stderr
        )
        sys.exit(1)
    # This worker's slot in the flags that say which workers are busy (service.engine.lanes).
    os.environ["SEPCONV_WORKER_INDEX"] = str(index)
    # The environment carries every setting (CLI flags included) into the spawned process.
    # uvicorn returns (instead of raising) when the app's start-up fails.
    # The app's other listening sockets (gRPC) join their port's SO_REUSEPORT group too.
    if not serve(Settings(), uvicorn_kwargs, sockets=[sock], reuse_port=True):
        sys.exit(3)


def run_workers(
    workers: int,
    uvicorn_kwargs: dict[str, Any],
    grace_s: float,
    extra_ports: Sequence[int] = (),
) -> int:
    """Spawn ``workers`` servers and supervise them; the exit status for ``python -m service``.

    ``grace_s``: how long a worker may take to stop after SIGTERM (drain delay + graceful
    shutdown) before it is killed, ``KILL_AFTER_GRACE_S`` later. ``extra_ports`` are the other
    ports each worker binds in the same SO_REUSEPORT way (gRPC), checked free here for the same
    reason as the HTTP port.
    """
    host = uvicorn_kwargs["host"]
    for port in (uvicorn_kwargs["port"], *extra_ports):
        try:
            check_port_free(host, port)
        except OSError as exc:
            print(f"sepconv-serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
            return 1
    port = uvicorn_kwargs["port"]

    # spawn, not fork: a forked child would inherit this process's threads and locks half-held.
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_main, args=(i, uvicorn_kwargs, os.getpid()), name=f"sepconv-worker-{i}"
        )
        for i in range(workers)
    ]
    stopping = False
    deadline = float("inf")

    def stop(signum: int = signal.SIGTERM, *_: object) -> None:
        nonlocal stopping, deadline
        if not stopping:
            stopping = True
            deadline = time.monotonic() + grace_s + KILL_AFTER_GRACE_S
        # The same signal the supervisor got: SIGTERM makes each worker drain its requests,
        # Ctrl-C (SIGINT) skips the drain delay there too.
        forwarded = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, forwarded)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for p in procs:
            p.start()
        log.info("%d workers on %s:%d, one SO_REUSEPORT socket each", workers, host, port)
        alive = list(procs)
        while alive and time.monotonic() < deadline:
            # A timeout, so a signal that arrives while waiting is acted on within a second.
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=1.0)
            for p in [p for p in alive if p.exitcode is not None]:
                alive.remove(p)
                if not stopping:
                    log.error(
                        "worker %s exited with status %s; stopping the others", p.name, p.exitcode
                    )
                    status = 1
                    stop()
    finally:
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                p.join(
                    max(
                        0.0, min(deadline, time.monotonic() + KILL_AFTER_GRACE_S) - time.monotonic()
                    )
                )
            if p.pid is not None and p.exitcode is None:
                log.error("worker %s did not stop in time; killing it", p.name)
                status = 1
                p.kill()
                p.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
