"""``SEPCONV_WORKERS`` > 1: one SO_REUSEPORT socket per worker, fail-fast supervision.

These start real ``python -m service`` processes on loopback (a few seconds each).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.server import ServerProcess, free_port, listeners, tcp_sockets
from service.supervisor import bind_reuseport, check_port_free, reuseport_available

from .waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not reuseport_available() or not Path("/proc/net/tcp").exists(),
        reason="needs Linux: SO_REUSEPORT and /proc/net/tcp",
    ),
]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _workers(pid: int) -> list[int]:
    """The supervisor's spawned workers (not multiprocessing's resource tracker)."""
    return [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[len("socket:[") : -1]))
    return out


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {timeout_s} s after the event")


@pytest.fixture
def two_workers(tmp_path, tiny_model_path):
    with ServerProcess(
        tiny_model_path,
        {"SEPCONV_WORKERS": "2", "SEPCONV_GRACEFUL_SHUTDOWN_S": "2", "SEPCONV_LOG_LEVEL": "info"},
        tmp_path / "server.log",
        ready_timeout_s=60,
    ) as server:
        yield server


def test_every_worker_listens_on_its_own_socket(two_workers):
    # ServerProcess waits for both; they are separate sockets, one per worker process.
    assert listeners(two_workers.port) == 2
    workers = _workers(two_workers.proc.pid)
    assert len(workers) == 2
    listening = {inode for state, inode in tcp_sockets(two_workers.port) if state == "0A"}
    for pid in workers:
        assert len(_socket_inodes(pid) & listening) == 1
    # Spawned workers set up the service's logging too, not only uvicorn's.
    assert two_workers.log_tail(200).count("ready in") == 2


def test_a_burst_of_connections_reaches_both_workers(two_workers):
    # Opened at once, like a client pool: on one shared socket the first worker to wake can
    # accept them all. The kernel hashes each connection to one of the two sockets; all 24 on
    # one worker would happen by chance once in 8 million runs.
    conns = [socket.create_connection(("127.0.0.1", two_workers.port)) for _ in range(24)]
    try:
        per_worker: list[int] = []

        def all_accepted() -> bool:
            # Each worker accepts its connections when its event loop gets to them.
            established = {ino for st, ino in tcp_sockets(two_workers.port) if st == "01"}
            per_worker[:] = [
                len(_socket_inodes(pid) & established) for pid in _workers(two_workers.proc.pid)
            ]
            return sum(per_worker) == len(conns)

        wait_until(all_accepted, lambda: f"accepted per worker: {per_worker} of {len(conns)}")
        assert sum(per_worker) == len(conns)
        assert min(per_worker) >= 1, per_worker
    finally:
        for conn in conns:
            conn.close()


def test_sigterm_stops_every_worker(two_workers):
    workers = _workers(two_workers.proc.pid)
    proc = two_workers.proc
    proc.send_signal(signal.SIGTERM)
    assert _wait_exit(proc, 20) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_dead_worker_stops_the_server_with_an_error(two_workers):
    proc = two_workers.proc
    victim, survivor = _workers(proc.pid)
    os.kill(victim, signal.SIGKILL)
    assert _wait_exit(proc, 20) == 1
    assert not Path(f"/proc/{survivor}").exists()
    assert "stopping the others" in two_workers.log_tail()


def test_workers_stop_when_the_supervisor_is_killed(two_workers):
    """SIGKILL gives the supervisor no chance to stop its workers: they must notice alone,
    not serve on unsupervised."""
    proc = two_workers.proc
    workers = _workers(proc.pid)
    proc.kill()
    _wait_exit(proc, 10)

    def gone(pid: int) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        return not stat.exists() or ") Z " in stat.read_text()

    wait_until(lambda: all(gone(pid) for pid in workers), "the workers outlived the supervisor")


def test_busy_port_is_a_clear_error_at_once(tmp_path, tiny_model_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEPCONV_")}
        env |= {
            "SEPCONV_MODEL_PATH": str(tiny_model_path),
            "SEPCONV_PORT": str(port),
            "SEPCONV_WORKERS": "2",
        }
        proc = subprocess.run(
            [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_port_check_refuses_to_join_another_servers_group():
    # A second server on the same port must not silently share the first one's traffic.
    port = free_port()
    first = bind_reuseport("127.0.0.1", port)
    try:
        first.listen()
        with pytest.raises(OSError):
            check_port_free("127.0.0.1", port)
    finally:
        first.close()
    check_port_free("127.0.0.1", port)
