"""``python -m bench overload``: the report's arithmetic, RSS sampling, and one short real run
against the tiny model (bounded: a few seconds of load on loopback)."""

from __future__ import annotations

import json
import os

import pytest

from bench import hey, loadgen, overload
from bench.__main__ import main as bench_main


def test_refusals_get_their_own_latencies():
    result = loadgen.RunResult("open", 8, 100.0, 1.0)
    loadgen._record(result, 200, None, 0.050)
    loadgen._record(result, 429, None, 0.002)
    loadgen._record(result, 503, None, 0.004)
    loadgen._record(result, 504, None, 10.0)
    summary = result.summary()
    assert summary["ok"] == 1 and summary["refused"] == 2
    assert summary["refused_p99_ms"] == pytest.approx(3.98)
    assert summary["error_kinds"] == {"http_429": 1, "http_503": 1, "http_504": 1}


def test_point_and_targets_arithmetic():
    result = loadgen.RunResult("open", 64, 400.0, 2.0)
    result.latencies = [0.05] * 180 + [0.2] * 20  # 100 req/s of goodput
    result.refused_latencies = [0.001] * 500
    result.errors.update({"http_429": 500, "http_504": 3})
    point = overload._point(result, 4.0, 400.0, capacity=110.0)
    assert point["goodput_per_s"] == 100.0 and point["goodput_fraction"] == pytest.approx(0.909)
    assert (point["http_429"], point["http_504"], point["other_errors"]) == (500, 3, 0)
    point |= {"seconds": 2.0, "rss_peak_mb": 300.0}
    entry = {"budget_ms": 100.0, "full_batch_ms": 50.0, "capacity_per_s": 110.0}
    entry["points"] = [point]
    met = {t["target"].split(" (")[0]: t["met"] for t in overload.check_targets(entry)}
    assert met[">= 90% of capacity as goodput at 4x"] is True
    assert met["no 504 at 4x"] is False
    assert met["accepted p99 <= budget + one batch"] is False  # 200 ms > 150 ms
    assert met["refusals p99 <= 5 ms at 4x"] is True


def test_rounds_give_the_median_of_every_figure():
    rounds = [
        {"factor": 4.0, "goodput_fraction": g, "refused_p99_ms": r, "http_504": 0, "note": "x"}
        for g, r in ((0.9, 5.0), (0.8, 40.0), (0.95, 6.0))
    ]
    point = overload.median_point(rounds)
    assert point["goodput_fraction"] == 0.9 and point["refused_p99_ms"] == 6.0
    assert point["goodput_fraction_range"] == (0.8, 0.95)
    assert point["refused_p99_ms_range"] == (5.0, 40.0)
    assert point["rounds"] == 3 and point["note"] == "x" and point["factor"] == 4.0
    assert overload._fraction(point) == "0.90x (0.80-0.95)"


def test_process_group_rss_counts_this_process():
    assert overload.process_group_rss(os.getpgrp()) > 10 * 2**20
    assert overload.process_group_rss(2**22 + 12345) == 0  # no such group


def test_a_short_overload_run_writes_the_report(tiny_model_path, tmp_path):
    code = bench_main(
        [
            "overload",
            "--models",
            str(tiny_model_path),
            "--workers",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--raw-duration",
            "0.3",
            "--factors",
            "2",
            "--factor-duration",
            "1",
            "--pause",
            "0.2",
            "--idle",
            "0.2",
            "--storm",
            "16",
            "--rounds",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "overload_results.json").read_text())
    (model,) = results["models"]
    assert model["capacity_per_s"] > 0
    (point,) = model["points"]
    assert point["factor"] == 2.0 and point["goodput_per_s"] > 0 and point["rounds"] == 2
    assert len(model["rounds"]) == 2 and len(model["capacities_per_s"]) == 2
    assert model["rss_start_mb"] > 0 and len(model["rss_curve"]) >= 2
    storm = model["storm"]
    assert storm["clients"] == 16 and storm["goodput_per_s"] > 0 and storm["refused_per_s"] >= 0
    assert storm["server_cores"] > 0 and storm["client_cores"] > 0 and storm["client"] == "loadgen"
    report = (tmp_path / "overload_results.md").read_text()
    assert "| 2x |" in report and "Retry storm: 16 closed-loop clients" in report
    assert (tmp_path / f"overload_{model['key']}_rss.png").stat().st_size > 1000


@pytest.mark.skipif(not hey.available(), reason="needs hey (Debian package hey)")
def test_a_storm_only_run_with_hey(tiny_model_path, tmp_path):
    """``--factors none --storm-client hey``: the capacity, then the storm from hey, read into
    the same figures (its own CPU included)."""
    args = ["overload", "--models", str(tiny_model_path), "--workers", "1", "--duration", "0.5"]
    args += ["--warmup", "0.1", "--raw-duration", "0.2", "--factors", "none", "--storm", "8"]
    args += ["--storm-client", "hey", "--factor-duration", "1", "--pause", "0", "--idle", "0"]
    assert bench_main([*args, "--out", str(tmp_path)]) == 0
    (model,) = json.loads((tmp_path / "overload_results.json").read_text())["models"]
    assert model["points"] == [] and model["capacity_per_s"] > 0
    storm = model["storm"]
    assert storm["client"] == "hey" and storm["goodput_per_s"] > 0 and storm["client_cores"] > 0
    assert "(hey)" in (tmp_path / "overload_results.md").read_text()


def test_factors_none_needs_a_storm():
    with pytest.raises(SystemExit):
        bench_main(["overload", "--factors", "none", "--storm", "0"])
