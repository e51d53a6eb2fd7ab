"""Multiprocess metric values written in batches (service/metric_values.py): nothing is lost,
a process's own /metrics is always current, other processes' values arrive within the flush
interval. Each check runs in a fresh interpreter: multiprocess mode is chosen at import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import time
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
    from prometheus_client import values

    from service import metric_values
    from service import metrics  # installs the buffered values before its metrics exist

    def on_file(name):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry.get_sample_value(name) or 0.0

    assert values.ValueClass.buffered and metric_values.installed()
    metric_values.install()  # idempotent
    counter = Counter("t_requests_total", "requests")
    gauge = Gauge("t_depth", "depth", multiprocess_mode="livesum")
    histogram = Histogram("t_seconds", "latency", buckets=(0.1, 1.0))
    interval = metric_values.FLUSH_INTERVAL_S

    # Increments wait in memory, then reach the file together.
    for _ in range(1000):
        counter.inc()
        histogram.observe(0.05)
    gauge.set(7)
    gauge.inc(2)
    metric_values.flush()
    assert on_file("t_requests_total") == 1000
    assert on_file("t_seconds_count") == 1000 and on_file("t_seconds_bucket") == 0.0
    assert on_file("t_depth") == 9.0  # set, then the increment after it

    # The background thread writes within the flush interval, without being asked.
    counter.inc(5)
    time.sleep(interval * 3)
    assert on_file("t_requests_total") == 1005

    # This process's own exposition (what /metrics renders) flushes first.
    counter.inc(3)
    assert metrics.exposition_registry().get_sample_value("t_requests_total") == 1008

    # Reading a value flushes too (tests read values directly).
    counter.inc(2)
    assert counter._value.get() == 1010 and on_file("t_requests_total") == 1010
    print("ok")
    """
)


def test_multiprocess_values_are_written_in_batches_and_never_lost(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_one_process_keeps_prometheus_clients_own_values(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    code = (
        "from prometheus_client import values\n"
        "from service import metric_values, metrics\n"
        "assert values.ValueClass is values.MutexValue and not metric_values.installed()\n"
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
