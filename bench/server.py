"""Start ``python -m service`` as a child process on loopback, wait until ready, stop it."""

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


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


class ServerProcess:
    """``with ServerProcess(model, env) as server:`` -> serving on ``server.port`` until exit.

    ``env`` holds ``SEPCONV_*`` settings on top of the model path, loopback host and a free
    port. The server's output goes to ``log_path`` so a failed start can be explained.
    """

    def __init__(
        self,
        model_path: Path,
        settings_env: dict[str, str],
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ready_timeout_s: float = 120.0,
        cwd: Path | None = None,
    ):
        self.model_path = Path(model_path)
        self.host = host
        # A fixed port restarts a server where a load balancer expects it (bench/rolling.py).
        self.port = port or free_port(host)
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        #: Run ``python -m service`` from this checkout (another commit, for an A/B run).
        self.cwd = cwd
        self.env = {
            **os.environ,
            **settings_env,
            "SEPCONV_MODEL_PATH": str(self.model_path),
            "SEPCONV_HOST": host,
            "SEPCONV_PORT": str(self.port),
            "SEPCONV_LOG_LEVEL": settings_env.get("SEPCONV_LOG_LEVEL", "warning"),
            # The benchmark drives HTTP; gRPC's fixed default port could clash with a server
            # already running here.
            "SEPCONV_GRPC_PORT": settings_env.get("SEPCONV_GRPC_PORT", "0"),
        }
        self.workers = self._workers()
        self.proc: subprocess.Popen[bytes] | None = None

    def _workers(self) -> int:
        """How many processes will listen: the server resolves ``auto`` the same way."""
        from service.settings import Settings

        value = self.env.get("SEPCONV_WORKERS", "auto")
        return Settings(workers=value if value == "auto" else int(value)).resolved_workers

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        # Own process group: uvicorn's worker processes can then be stopped with the server.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(
                    f"server exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            # With several workers, one ready worker answers /readyz while the others may still
            # be loading; connections opened then would all land on the first.
            if _status(self.base_url + "/readyz") == 200 and self._all_workers_listening():
                return
            time.sleep(0.2)
        raise ServerError(
            f"server not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def _all_workers_listening(self) -> bool:
        count = listeners(self.port)
        # 0 means no /proc/net/tcp to read (not Linux): readiness rests on /readyz alone.
        return count == 0 or count >= self.workers

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful: uvicorn drains), then SIGKILL to the group if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # Workers left behind by a crashed parent are in the same group: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
