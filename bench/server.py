"""Servers as child processes on loopback: start, wait until ready, stop.

:class:`ManagedServer` knows nothing but a command line, a readiness URL and a port (the peers
in ``bench.peers`` use it as is); :class:`ServerProcess` is ``python -m service`` with
``SEPCONV_*`` settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


class ServerError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tcp_sockets(port: int) -> list[tuple[str, int]]:
    """(state, inode) of every TCP socket whose local port is ``port``, from /proc/net/tcp{,6}.

    States are the kernel's hex codes: ``0A`` listening, ``01`` established. Empty where /proc
    is not Linux's.
    """
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table)  # header
            for line in table:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    out.append((fields[3], int(fields[9])))
    return out


def listeners(port: int) -> int:
    """How many sockets listen on ``port``: one per ready worker under SO_REUSEPORT."""
    return sum(state == "0A" for state, _ in tcp_sockets(port))


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


class ManagedServer:
    """``with ManagedServer(argv, port, ready_path, log_path) as s:`` serves on ``s.port``.

    Ready means ``ready_path`` answers 200 and ``workers`` sockets listen on the port: a
    server with several workers (each its own SO_REUSEPORT socket) answers readiness from the
    first one, and connections opened before the others listen would all land on it. The
    output goes to ``log_path`` so a failed start can be explained.
    """

    def __init__(
        self,
        argv: list[str],
        port: int,
        ready_path: str,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        workers: int = 1,
        ready_timeout_s: float = 180.0,
        cwd: Path | None = None,
    ):
        self.argv = argv
        self.port = port
        self.host = host
        self.ready_path = ready_path
        self.log_path = Path(log_path)
        self.env = env
        self.workers = workers
        self.ready_timeout_s = ready_timeout_s
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            # Own process group, so worker processes stop with the server.
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = self.base_url + self.ready_path
        name = " ".join(self.argv[:3])
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            if http_status(url) == 200:
                count = listeners(self.port)
                # 0 means no /proc/net/tcp to read (not Linux): readiness rests on the URL alone.
                if count == 0 or count >= self.workers:
                    return
            time.sleep(0.2)
        raise ServerError(
            f"{name} not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful: uvicorn drains), then SIGKILL to the whole group if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Workers left behind by the parent are in the same group: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class ServerProcess(ManagedServer):
    """``with ServerProcess(model, env) as server:`` -> serving on ``server.port`` until exit.

    ``env`` holds ``SEPCONV_*`` settings on top of the model path, loopback host and a free
    port; with ``SEPCONV_MODEL_REPOSITORY`` among them, ``model_path`` is None and the server
    serves the repository instead.
    """

    def __init__(
        self,
        model_path: Path | None,
        settings_env: dict[str, str],
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ready_timeout_s: float = 120.0,
        cwd: Path | None = None,
    ):
        self.model_path = Path(model_path) if model_path is not None else None
        # A fixed port restarts a server where a load balancer expects it (bench/rolling.py).
        port = port or free_port(host)
        model = {} if self.model_path is None else {"SEPCONV_MODEL_PATH": str(self.model_path)}
        env = {
            **os.environ,
            **settings_env,
            **model,
            "SEPCONV_HOST": host,
            "SEPCONV_PORT": str(port),
            "SEPCONV_LOG_LEVEL": settings_env.get("SEPCONV_LOG_LEVEL", "warning"),
            # The benchmark drives HTTP; gRPC's fixed default port could clash with a server
            # already running here.
            "SEPCONV_GRPC_PORT": settings_env.get("SEPCONV_GRPC_PORT", "0"),
        }
        super().__init__(
            [sys.executable, "-m", "service"],
            port,
            "/readyz",
            log_path,
            env=env,
            host=host,
            workers=_workers(env),
            ready_timeout_s=ready_timeout_s,
            # ``cwd``: run ``python -m service`` from another checkout (an A/B run).
            cwd=cwd,
        )


def _workers(env: dict[str, str]) -> int:
    """How many processes will listen: the server resolves ``auto`` the same way."""
    from service.settings import Settings

    value = env.get("SEPCONV_WORKERS", "auto")
    return Settings(workers=value if value == "auto" else int(value)).resolved_workers


def group_stat_fields(pgid: int) -> Iterator[list[str]]:
    """The ``/proc/<pid>/stat`` fields after the command name (``fields[0]`` is the state,
    field 3 of stat) of every live process in the process group ``pgid``: a server and its
    workers, started in a session of their own."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:  # pgrp is field 5
            yield fields
