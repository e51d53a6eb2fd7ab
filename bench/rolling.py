"""A rolling update through a real load balancer, on loopback: does any request fail?

Two replicas of ``python -m service`` (A with two workers under the supervisor, B with one)
behind HAProxy, which health-checks ``/readyz`` every 250 ms, as endpoints follow readiness.
Two modes:

- ``tcp``: layer 4, like a Kubernetes Service (kube-proxy): a client's keep-alive connection is
  pinned to one replica for its whole life, so the replica itself must get clients off it;
- ``http``: layer 7, like an ingress controller: HAProxy parses requests, pools its own server
  connections and retries refused connections on the other replica.

Steady load at a fixed rate goes through HAProxy on keep-alive connections; A gets SIGTERM,
drains, exits, and is started again on the same port; the load runs until A is back in
rotation. Every request is counted: an answer other than 200, or a connection error, is a
failure. Goodput is counted in 250 ms bins.

    python -m bench.rolling                   # both modes, drain 3 s vs none -> docs/results/
    python -m bench.rolling --modes tcp --drain 3 --rate 200 --concurrency 8

tests/test_rolling_update.py runs a short one in CI and requires zero failures.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench import RESULTS
from bench.server import ServerProcess, free_port

BIN_S = 0.25
HAPROXY_CFG = """\
global
    maxconn 512

defaults
    mode {mode}
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    # Retry a refused connection on the other replica, as production configs do; a request
    # already sent on a connection the server then closes is not retried (not idempotent).
    retries 2
    option redispatch 1

frontend api
    bind 127.0.0.1:{port}
    default_backend replicas

frontend stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 250ms fall 2 rise 2
    server a 127.0.0.1:{port_a} check
    server b 127.0.0.1:{port_b} check
"""


def haproxy_path() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


class HAProxy:
    """HAProxy in the foreground on loopback, for the length of a ``with`` block."""

    def __init__(self, workdir: Path, port_a: int, port_b: int, mode: str = "http") -> None:
        self.port = free_port()
        self.stats_port = free_port()
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(
            HAPROXY_CFG.format(
                mode=mode, port=self.port, stats_port=self.stats_port, port_a=port_a, port_b=port_b
            )
        )
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> HAProxy:
        exe = haproxy_path()
        if exe is None:
            raise RuntimeError("haproxy not found (apt-get install haproxy)")
        subprocess.run([exe, "-c", "-q", "-f", str(self.cfg)], check=True, timeout=10)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def servers(self) -> dict[str, dict[str, str]]:
        """Per replica: HAProxy's view (status UP/DOWN, stot = requests sent to it)."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and len(r["svname"]) == 1}

    def wait_status(self, server: str, status: str, timeout_s: float) -> float:
        """Wait until HAProxy reports ``server`` as ``status``; the time it took."""
        start = time.monotonic()
        seen: object = "no answer from the stats page"
        while time.monotonic() - start < timeout_s:
            try:
                seen = self.servers()[server]["status"]
            except OSError as exc:  # HAProxy still starting
                seen = exc
            if isinstance(seen, str) and seen.startswith(status):
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"HAProxy never saw replica {server} {status} (last: {seen})")


class Load:
    """``concurrency`` threads, each on its own keep-alive connection, at ``rate`` req/s in all."""

    def __init__(self, port: int, body: bytes, rate: float, concurrency: int) -> None:
        self.port, self.body = port, body
        self.interval = concurrency / rate
        self.concurrency = concurrency
        self.stop = threading.Event()
        self.results: list[tuple[float, str]] = []  # (completion time, "200" | error kind)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]
        self.t0 = 0.0

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        for i, t in enumerate(self.threads):
            time.sleep(self.interval / self.concurrency * (i > 0))  # spread the phases
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_send = time.monotonic()
        while not self.stop.is_set():
            try:
                conn.request(
                    "POST", "/v1/classify", body=self.body, headers={"Content-Type": "image/png"}
                )
                resp = conn.getresponse()
                resp.read()
                outcome = str(resp.status)
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()  # http.client reconnects on the next request
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                conn.close()
            with self.lock:
                self.results.append((time.monotonic() - self.t0, outcome))
            next_send += self.interval
            delay = next_send - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                next_send = time.monotonic()  # fell behind: do not burst to catch up
        conn.close()

    def mark(self) -> float:
        return time.monotonic() - self.t0


def run(
    model_path: Path,
    workdir: Path,
    body: bytes,
    *,
    drain_delay_s: float,
    mode: str = "tcp",
    rate: float = 100.0,
    concurrency: int = 4,
    warm_s: float = 2.0,
    after_s: float = 2.0,
) -> dict[str, Any]:
    """One rolling update of replica A under load; the counts and the goodput timeline."""
    env = {
        "SEPCONV_DRAIN_DELAY_S": str(drain_delay_s),
        "SEPCONV_GRACEFUL_SHUTDOWN_S": "5",
        "SEPCONV_LOG_LEVEL": "info",
    }
    env_a = {**env, "SEPCONV_WORKERS": "2"}
    env = {**env, "SEPCONV_WORKERS": "1"}
    log_a = workdir / "replica-a.log"
    a = ServerProcess(model_path, env_a, log_a, ready_timeout_s=60)
    b = ServerProcess(model_path, env, workdir / "replica-b.log", ready_timeout_s=60)
    events: dict[str, float] = {}
    with a, b, HAProxy(workdir, a.port, b.port, mode) as lb:
        lb.wait_status("a", "UP", 10)
        lb.wait_status("b", "UP", 10)
        with Load(lb.port, body, rate, concurrency) as load:
            time.sleep(warm_s)
            served_a_before = int(lb.servers()["a"]["stot"])
            events["sigterm"] = load.mark()
            a.proc.send_signal(signal.SIGTERM)
            lb.wait_status("a", "DOWN", 10)
            events["haproxy_down"] = load.mark()
            a.proc.wait(drain_delay_s + 5 + 10)
            events["exited"] = load.mark()
            a.stop()
            a.log_path = workdir / "replica-a-restarted.log"
            a.__enter__()  # the same port, so HAProxy finds it again
            events["restarted_ready"] = load.mark()
            lb.wait_status("a", "UP", 20)
            events["haproxy_up"] = load.mark()
            time.sleep(after_s)
            servers = lb.servers()
        results = list(load.results)
    return {
        "mode": mode,
        **summarize(results, events, rate, servers, served_a_before, drain_delay_s),
    }


def summarize(
    results: list[tuple[float, str]],
    events: dict[str, float],
    rate: float,
    servers: dict[str, dict[str, str]],
    served_a_before: int,
    drain_delay_s: float,
) -> dict[str, Any]:
    outcomes = Counter(o for _, o in results)
    failed = sum(n for o, n in outcomes.items() if o != "200")
    end = max(t for t, _ in results)
    bins = [0] * (int(end / BIN_S) + 1)
    for t, o in results:
        if o == "200":
            bins[int(t / BIN_S)] += 1
    goodput = [n / BIN_S for n in bins[1:-1]]  # whole bins only
    # The bins from SIGTERM until A is back in rotation: where a dip would be.
    lo, hi = int(events["sigterm"] / BIN_S), int(events["haproxy_up"] / BIN_S) + 1
    during = [n / BIN_S for n in bins[lo:hi]] or [0.0]
    before = [n / BIN_S for n in bins[1:lo]] or [0.0]
    return {
        "drain_delay_s": drain_delay_s,
        "target_rate": rate,
        "requests": len(results),
        "ok": outcomes.get("200", 0),
        "failed": failed,
        "outcomes": dict(outcomes),
        "events_s": {k: round(v, 3) for k, v in events.items()},
        "goodput_before_req_s": round(sum(before) / len(before), 1),
        "goodput_during_mean_req_s": round(sum(during) / len(during), 1),
        "goodput_during_min_req_s": round(min(during), 1),
        "goodput_bins_req_s": goodput,
        "served_by_a_before": served_a_before,
        "served_by_a_total": int(servers["a"]["stot"]),
        "served_by_b_total": int(servers["b"]["stot"]),
    }


def main() -> int:
    from bench.models import default_model, sample_images

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="*", default=["tcp", "http"], choices=["tcp", "http"])
    ap.add_argument("--drain", type=float, nargs="*", default=[3.0, 0.0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "rolling_update.json",
        help="the report (default: %(default)s)",
    )
    args = ap.parse_args()
    # Stopped from outside: unwind the with-blocks, so no replica or HAProxy outlives the run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    with tempfile.TemporaryDirectory(prefix="sepconv-rolling-") as tmp:
        workdir = Path(tmp)
        model = default_model()  # the trained default, else an untrained stand-in of its shape
        body = sample_images(model.spec, 1)[0]
        plan = [(m, d) for _ in range(args.repeat) for m in args.modes for d in args.drain]
        for i, (mode, delay) in enumerate(plan):
            run_dir = workdir / f"{i}-{mode}-drain-{delay:g}"
            run_dir.mkdir()
            result = run(
                model.path,
                run_dir,
                body,
                drain_delay_s=delay,
                mode=mode,
                rate=args.rate,
                concurrency=args.concurrency,
            )
            print(json.dumps({k: v for k, v in result.items() if k != "goodput_bins_req_s"}))
            runs.append(result)
    meta = {"command": "python -m bench.rolling " + " ".join(sys.argv[1:]), "model": model.title}
    args.out.write_text(json.dumps({**meta, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
