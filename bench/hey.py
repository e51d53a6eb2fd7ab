"""Load from ``hey`` (https://github.com/rakyll/hey, Debian package ``hey``), the tool the
issues measured with, read into the same :class:`~bench.loadgen.RunResult` as our own generator.

Our generator (:mod:`bench.loadgen`) costs about 25 µs of CPU per request; hey, a Go HTTP client,
costs about ten times that. Where the client shares the server's cores and sends requests as
fast as it is answered (a retry storm of refusals), what the client burns comes out of the
server's capacity, so a storm measured with our generator looks milder than the same storm from
hey. ``--storm-client hey`` (``python -m bench overload``) runs the storm with hey.

hey resends a refused request at once, like ``hey -c N`` in the issues; its CSV output gives each
answer's status and latency. Connection errors do not appear in it.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import shutil
import subprocess
import tempfile
import time

from bench.loadgen import REFUSALS, RunResult, Target


def available() -> bool:
    return shutil.which("hey") is not None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def closed_loop(target: Target, *, concurrency: int, duration_s: float) -> RunResult:
    """``hey -z DURATION -c CONCURRENCY`` against ``target`` (its first body), as a RunResult
    whose client CPU is hey's own."""
    if not available():
        raise RuntimeError("hey is not installed (Debian: apt-get install hey)")
    with tempfile.NamedTemporaryFile(suffix=".body") as body:
        body.write(target.bodies[0])
        body.flush()
        argv = [
            "hey",
            "-z",
            f"{duration_s:g}s",
            "-c",
            str(concurrency),
            "-m",
            "POST",
            "-T",
            target.content_type,
            "-D",
            body.name,
            "-o",
            "csv",
            *(arg for k, v in target.extra_headers for arg in ("-H", f"{k}: {v}")),
            f"http://{target.host}:{target.port}{target.path}",
        ]
        cpu0, wall0 = _children_cpu(), time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=os.environ)
        wall = time.perf_counter() - wall0
        cpu = _children_cpu() - cpu0
    result = RunResult("closed", concurrency, None, duration_s)
    result.client_cpu_s = cpu
    for row in csv.DictReader(io.StringIO(out.stdout)):
        status = int(row["status-code"])
        latency = float(row["response-time"])
        if 200 <= status < 300:
            result.latencies.append(latency)
        else:
            result.errors[f"http_{status}"] += 1
            if status in REFUSALS:
                result.refused_latencies.append(latency)
    result.duration_s = min(duration_s, wall)
    return result
