"""Run any HTTP server command as a child on loopback, wait until it serves, stop it.

:class:`bench.server.ServerProcess` knows sepconv-serve's settings; this one knows nothing but
a command line, a readiness URL and a port, so the same code starts sepconv-serve with no
settings at all, the plain FastAPI peer and KServe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.server import ServerError, listeners


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
    first one, and connections opened before the others listen would all land on it.
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
    ):
        self.argv = argv
        self.port = port
        self.host = host
        self.ready_path = ready_path
        self.log_path = Path(log_path)
        self.env = env
        self.workers = workers
        self.ready_timeout_s = ready_timeout_s
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
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.argv[0]} exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            if http_status(url) == 200:
                count = listeners(self.port)
                # 0 means no /proc/net/tcp to read (not Linux): readiness rests on the URL alone.
                if count == 0 or count >= self.workers:
                    return
            time.sleep(0.2)
        raise ServerError(
            f"{' '.join(self.argv[:3])} not ready after {self.ready_timeout_s:.0f} s:\n"
            f"{self.log_tail()}"
        )

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
