"""Run any HTTP server command as a child on loopback, wait until it serves, stop it.

:class:`bench.server.ServerProcess` knows sepconv-serve's settings; this one knows nothing but
a command line, a readiness URL and a port, so the same code starts sepconv-serve with no
settings at all, the plain FastAPI peer and KServe.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.server import ServerError, listeners

#: sepconv-serve's supervisor says how many workers it started (service/supervisor.py).
_WORKERS_LINE = re.compile(rb"(\d+) workers on \S+:\d+")


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

    Ready means ``ready_path`` answers 200 and the number of sockets listening on the port has
    settled: a server with several workers (each its own SO_REUSEPORT socket) answers readiness
    from the first one, and connections opened before the others listen all land on it.
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
        ready_timeout_s: float = 180.0,
        settle_s: float = 1.0,
    ):
        self.argv = argv
        self.port = port
        self.host = host
        self.ready_path = ready_path
        self.log_path = Path(log_path)
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.settle_s = settle_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ManagedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with self.log_path.open("wb") as log:
            # Own process group, so worker processes stop with the server.
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
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
        stable_since, last = None, -1
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.argv[0]} exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            if http_status(url) == 200:
                count = listeners(self.port)
                if count != last:
                    stable_since, last = time.monotonic(), count
                expected = self.announced_workers()
                settled = time.monotonic() - stable_since >= self.settle_s
                # 0 listeners means no /proc/net/tcp to read: readiness rests on the URL alone.
                if count == 0 or (count >= expected and settled):
                    return
            time.sleep(0.2)
        raise ServerError(
            f"{' '.join(self.argv[:3])} not ready after {self.ready_timeout_s:.0f} s:\n"
            f"{self.log_tail()}"
        )

    def announced_workers(self) -> int:
        with contextlib.suppress(OSError):
            match = _WORKERS_LINE.search(self.log_path.read_bytes())
            if match:
                return int(match.group(1))
        return 1

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful), then SIGKILL to the whole group if it hangs."""
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
