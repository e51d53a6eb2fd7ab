"""The benchmark's load generator and statistics, against a real server on loopback."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pytest

from bench import loadgen
from bench.__main__ import WORKLOADS, legacy_hint, parse_args
from bench.harness import server_env
from bench.models import BenchModel, sample_images
from bench.report import markdown, plot
from bench.server import ServerError, ServerProcess, free_port
from bench.sweep import check_targets
from bench.targets import oip_binary_request, target_for
from sepconv.spec import read_spec
from service.protocols import oip


def test_percentile_matches_numpy_linear_definition():
    data = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(data, 50) == pytest.approx(50.5)
    assert loadgen.percentile(data, 99) == pytest.approx(99.01)
    assert loadgen.percentile(data, 0) == 1.0
    assert loadgen.percentile(data, 100) == 100.0
    rng = np.random.default_rng(0)
    sample = rng.exponential(size=997).tolist()
    for q in (1, 37.5, 90, 99.9):
        assert loadgen.percentile(sample, q) == pytest.approx(np.percentile(sample, q))
    assert loadgen.percentile([3.0, 1.0, 2.0], 50) == 2.0  # input need not be sorted
    assert math.isnan(loadgen.percentile([], 50))
    with pytest.raises(ValueError):
        loadgen.percentile(data, 101)


def test_run_result_statistics():
    result = loadgen.RunResult("closed", 2, None, duration_s=2.0)
    result.latencies = [0.001 * v for v in range(1, 11)]
    result.errors.update({"http_400": 3, "connection": 1})
    summary = result.summary()
    assert (summary["ok"], summary["errors"], summary["requests"]) == (10, 4, 14)
    assert summary["req_per_s"] == 5.0  # successes only
    assert summary["p50_ms"] == pytest.approx(5.5)
    assert summary["max_ms"] == pytest.approx(10.0)
    assert summary["error_kinds"] == {"http_400": 3, "connection": 1}


def test_arrival_schedules():
    fixed = loadgen.arrival_times(200, 0.2, poisson=False)
    assert len(fixed) == 39  # k / 200 for k = 1..39, all before 0.2 s
    assert np.allclose(np.diff(fixed), 0.005)
    poisson = loadgen.arrival_times(1000, 10.0, poisson=True, seed=1)
    assert 9_500 < len(poisson) < 10_500
    assert poisson == sorted(poisson)
    assert poisson != loadgen.arrival_times(1000, 10.0, poisson=True, seed=2)


def test_connection_refused_is_counted_not_raised():
    target = loadgen.Target("127.0.0.1", free_port(), "/v1/classify", (b"x",))
    result = loadgen.run(
        loadgen.closed_loop(target, concurrency=2, duration_s=5.0, max_requests=4, timeout_s=2)
    )
    assert result.ok == 0
    assert result.errors == {"connection": 4}


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    env = {"SEPCONV_WORKERS": "1", "SEPCONV_INTRA_OP_THREADS": "1", "SEPCONV_MAX_BATCH_SIZE": "8"}
    log = tmp_path_factory.mktemp("bench") / "server.log"
    with ServerProcess(tiny_model_path, env, log, ready_timeout_s=60) as srv:
        yield srv
    assert srv.proc is None  # stopped


def _target(server, bodies):
    return loadgen.Target(server.host, server.port, "/v1/classify", tuple(bodies))


def test_closed_loop_counts_successes_and_bad_requests(server, make_png):
    # One connection alternates a good PNG and a non-image: exactly half are 400s.
    target = _target(server, [make_png(1), b"definitely not an image"])
    result = loadgen.run(
        loadgen.closed_loop(target, concurrency=1, duration_s=30.0, max_requests=20)
    )
    assert result.ok == 10
    assert result.errors == {"http_400": 10}
    assert all(0 < lat < 5 for lat in result.latencies)
    assert result.summary()["p50_ms"] > 0


def test_closed_loop_with_concurrency_is_bounded_by_request_count(server, make_png):
    target = _target(server, [make_png(seed) for seed in range(8)])
    result = loadgen.run(
        loadgen.closed_loop(target, concurrency=4, duration_s=30.0, max_requests=40)
    )
    assert result.total == 40
    assert result.ok == 40, dict(result.errors)
    assert result.throughput > 0
    assert result.client_cpu_s > 0


def test_open_loop_sends_the_schedule(server, make_png):
    target = _target(server, [make_png(seed) for seed in range(4)])
    result = loadgen.run(
        loadgen.open_loop(target, rate=200, duration_s=0.2, poisson=False, max_connections=8)
    )
    assert result.total == 39
    assert result.ok == 39, dict(result.errors)
    assert result.mode == "open" and result.target_rate == 200


def test_open_loop_does_not_reuse_stale_connections(server, make_png, monkeypatch):
    """A connection idle past the limit is closed and replaced, never written to."""
    opened = []
    real_open = loadgen.Connection.open

    async def counting_open(host, port):
        opened.append(1)
        return await real_open(host, port)

    monkeypatch.setattr(loadgen.Connection, "open", counting_open)
    target = _target(server, [make_png(seed) for seed in range(2)])
    monkeypatch.setattr(loadgen, "MAX_IDLE_REUSE_S", 0.0)  # every idle connection is stale
    result = loadgen.run(
        loadgen.open_loop(target, rate=50, duration_s=0.2, poisson=False, max_connections=4)
    )
    assert result.total >= 8 and result.ok == result.total, dict(result.errors)
    assert len(opened) == result.total  # a new connection for every request
    opened.clear()
    monkeypatch.setattr(loadgen, "MAX_IDLE_REUSE_S", 60.0)
    result = loadgen.run(
        loadgen.open_loop(target, rate=50, duration_s=0.2, poisson=False, max_connections=4)
    )
    assert result.ok == result.total and len(opened) < result.total  # reused while fresh


def test_server_start_failure_is_reported(tmp_path):
    missing = tmp_path / "missing.onnx"
    server = ServerProcess(missing, {}, tmp_path / "log", ready_timeout_s=30)
    with pytest.raises(ServerError, match="does not exist"):
        server.__enter__()
    assert server.proc is None


def test_bench_cli_flags_become_settings():
    _, args, _ = parse_args(["--workers", "2", "--max-wait-ms", "1.5", "--env", "ORT_SPINNING=1"])
    assert server_env(args) == {
        "SEPCONV_WORKERS": "2",
        "SEPCONV_MAX_WAIT_MS": "1.5",
        "SEPCONV_ORT_SPINNING": "1",
    }
    _, quick, _ = parse_args(["--quick", "--duration", "3"])
    assert (quick.concurrency, quick.duration, quick.open_fractions) == ([1, 8, 32], 3.0, [0.5])
    _, full, _ = parse_args(["--concurrency", "4,64", "--open-fractions", ""])
    assert (full.concurrency, full.duration, full.open_fractions) == ([4, 64], 5.0, [])


def test_each_workload_is_a_subcommand_and_sweep_is_the_default():
    assert WORKLOADS[0] == "sweep"
    for name in WORKLOADS:
        workload, args, argv = parse_args([name, "--duration", "2"])
        assert workload.name == args.workload == argv[0] == name
        assert args.duration == 2.0 and args.models and args.concurrency and args.name
    workload, args, argv = parse_args(["--quick"])
    assert (workload.name, argv, args.name) == ("sweep", ["sweep", "--quick"], "bench")
    assert parse_args(["overload"])[1].concurrency == [32]  # capacity at c=32
    assert parse_args(["overload", "--quick"])[1].duration == 2.0
    with pytest.raises(SystemExit):
        parse_args(["photos", "--quick"])  # photos has no trial preset
    with pytest.raises(SystemExit):
        parse_args(["no-such-workload"])


def test_old_workload_flags_fail_with_the_same_run_as_a_subcommand():
    with pytest.raises(SystemExit) as err:
        parse_args(["--overload", "--models", "224", "--overload-factors=2", "--soak", "9"])
    assert "python -m bench overload --models 224 --factors=2 --soak 9" in str(err.value)
    hint = legacy_hint(["--photos", "--photo-sizes", "64x48"])
    assert "python -m bench photos --sizes 64x48" in hint
    assert "bench overload --storm 0" in legacy_hint(["overload", "--overload-storm", "0"])
    assert legacy_hint(["overload", "--storm", "0"]) is None


def test_oip_request_body_is_what_the_server_parses(tiny_model_path):
    spec = read_spec(str(tiny_model_path))
    image = sample_images(spec, count=1)[0]
    header, body = oip_binary_request(oip.IMAGE_INPUT, "BYTES", [1], oip.serialize_bytes([image]))
    request = oip.parse_request(body, str(len(header)), spec)
    assert request.images == [image]
    assert [(o.name, o.binary) for o in request.outputs] == [(oip.OUTPUT_NAME, True)]


@pytest.mark.parametrize("endpoint", ["classify", "oip", "oip-tensor"])
def test_every_endpoint_target_is_served(server, tiny_model_path, endpoint):
    model = BenchModel("default", "tiny", tiny_model_path, read_spec(str(tiny_model_path)), False)
    target = target_for(model, server.host, server.port, endpoint)
    assert len(set(target.bodies)) == 64
    result = loadgen.run(
        loadgen.closed_loop(target, concurrency=2, duration_s=30.0, max_requests=8)
    )
    assert result.ok == 8, dict(result.errors)


def test_sample_images_match_the_model(tiny_rgb_model_path):
    from PIL import Image

    spec = read_spec(str(tiny_rgb_model_path))
    images = sample_images(spec, count=3)
    assert len(set(images)) == 3
    img = Image.open(io.BytesIO(images[0]))
    assert img.size == (32, 32) and img.mode == "RGB"


def test_targets_and_report(tiny_model_path, tmp_path):
    spec = read_spec(str(tiny_model_path))
    model = BenchModel("224", "big", tiny_model_path, spec, trained=False)
    raw = [
        {"batch": 1, "sessions": 1, "intra_op_threads": 2, "images_per_s": 100.0,
         "batch_latency_ms_p50": 10.0, "runs": 10},
        {"batch": 32, "sessions": 1, "intra_op_threads": 2, "images_per_s": 120.0,
         "batch_latency_ms_p50": 260.0, "runs": 10},
    ]  # fmt: skip
    result = loadgen.RunResult("closed", 1, None, 1.0, latencies=[0.0115] * 50)
    fast = loadgen.RunResult("closed", 32, None, 1.0, latencies=[0.3] * 100)
    points = [result.summary(), fast.summary()]
    targets = check_targets(model, raw, points)
    assert [t["met"] for t in targets] == [False, True]  # 100/120 < 0.9; 11.5 <= 10 + 2
    assert "at batch 32" in targets[0]["measured"]
    entry = {"key": "224", "title": "big", "raw": raw, "points": points, "targets": targets}
    env = {
        "command": "python -m bench",
        "date": "today",
        "cpu": "cpu",
        "cores": 2,
        "load_before": "0",
        "server_settings": "defaults",
        "endpoint": "classify",
        "duration_s": 1,
        "warmup_s": 0,
    }
    text = markdown({"environment": env, "models": [entry]})
    assert "| concurrency 32 | 100.0 | 0.83x |" in text
    assert "**no**" in text
    assert plot(entry, tmp_path / "plot.png").stat().st_size > 1000


def test_selftest_drives_a_trivial_server(capsys):
    from bench import selftest

    assert selftest.main(["--duration", "0.3", "--rate", "200"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["closed", "closed", "closed", "open"]
    assert all(float(r.split()[2]) > 0 for r in rows)  # every load level got answers


def test_a_short_sweep_writes_the_report(tiny_model_path, tmp_path):
    """``python -m bench`` end to end on the tiny model: a second of load, every file written."""
    import json

    from bench.__main__ import main

    args = ["--models", str(tiny_model_path), "--workers", "1", "--concurrency", "2"]
    args += ["--duration", "0.5", "--warmup", "0.1", "--raw-duration", "0.2", "--raw-batches", "2"]
    args += ["--open-fractions", "0.5", "--endpoint", "oip", "--out", str(tmp_path)]
    assert main(args) == 0
    results = json.loads((tmp_path / "bench_results.json").read_text())
    assert results["environment"]["command"].startswith("python -m bench sweep --models")
    assert results["environment"]["endpoint"] == "oip"
    (model,) = results["models"]
    assert [p["mode"] for p in model["points"]] == ["closed", "open"]
    assert all(p["ok"] > 0 and p["errors"] == 0 for p in model["points"]), model["points"]
    assert [r["batch"] for r in model["raw"]][0] == 1
    assert "| concurrency 2 |" in (tmp_path / "bench_results.md").read_text()
    assert (tmp_path / f"bench_{model['key']}.png").stat().st_size > 1000


def test_a_short_reload_run_swaps_without_a_failed_request(tiny_model_path, tmp_path):
    """``python -m bench reload`` end to end on the tiny model: one swap through the API, one
    through polling, two unload/load cycles; no request answered other than 200."""
    import json

    from bench.__main__ import main

    args = ["reload", "--models", str(tiny_model_path), "--workers", "1", "--concurrency", "2"]
    args += ["--duration", "0.5", "--warmup", "0.1", "--swaps", "1", "--interval", "0.2"]
    args += ["--poll", "0.1", "--cycles", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    (model,) = json.loads((tmp_path / "reload_results.json").read_text())["models"]
    assert [p["phase"] for p in model["phases"]] == ["api", "polling"]
    for phase in model["phases"]:
        assert phase["non_200"] == 0 and phase["swaps_window"]["ok"] > 0
        assert [e["version"] for e in phase["index_after"] if e["name"] == "bench"] == ["2"]
    assert model["memory"]["failures"] == 0 and len(model["memory"]["rss_mb"]) == 2
    assert all(t["met"] for t in model["targets"] if "RSS" not in t["target"]), model["targets"]
    assert "| api | swaps |" in (tmp_path / "reload_results.md").read_text()
    assert (tmp_path / f"reload_{model['key']}_rss.png").stat().st_size > 1000


def test_a_workload_is_registered_by_its_name(tiny_model_path, tmp_path, monkeypatch):
    """What `reload` (or any new workload) needs: a bench/<name>.py with a WORKLOAD, and its
    name in WORKLOADS; the harness does flags, presets, models and the report files."""
    import json
    import sys
    import types

    from bench import __main__ as cli
    from bench.harness import Workload

    seen = []

    def run_model(model, args, env):
        seen.append((model.path, args.duration, args.knob, env))
        return {"key": model.key, "title": model.title, "knob": args.knob}

    module = types.ModuleType("bench.trial")
    module.WORKLOAD = Workload(
        name="trial",
        help="a test workload",
        description="trial",
        add_arguments=lambda p: p.add_argument("--knob", type=int, default=3),
        run_model=run_model,
        markdown=lambda results: f"# trial {len(results['models'])}\n",
        load_seconds=lambda args: args.duration,
        defaults={"models": "default", "concurrency": [1], "duration": 7.0, "warmup": 0.0},
    )
    monkeypatch.setitem(sys.modules, "bench.trial", module)
    monkeypatch.setattr(cli, "WORKLOADS", (*cli.WORKLOADS, "trial"))
    argv = ["trial", "--models", str(tiny_model_path), "--workers", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert seen == [(tiny_model_path, 7.0, 3, {"SEPCONV_WORKERS": "1"})]
    assert (tmp_path / "trial_results.md").read_text() == "# trial 1\n"
    results = json.loads((tmp_path / "trial_results.json").read_text())
    assert [(m["key"], m["knob"]) for m in results["models"]] == [("model", 3)]  # file stem
    assert results["environment"]["command"].startswith("python -m bench trial --models")


def test_reports_go_to_docs_results_by_default(monkeypatch, capsys):
    """Every benchmark writes its report under docs/results/ unless told otherwise."""
    from bench import decoders, rolling, tracing_overhead
    from bench.peers.__main__ import parse_args as peers_args
    from model import cli as model_cli

    results = Path("docs/results")
    assert {parse_args([w])[1].out for w in WORKLOADS} == {results}
    assert peers_args([]).out == results
    monkeypatch.setattr("sys.argv", ["python -m bench.rolling", "--help"])
    for main in (
        rolling.main,
        lambda: decoders.main(["--help"]),
        lambda: tracing_overhead.main(["--help"]),
        lambda: model_cli.main(["sweep", "--help"]),
    ):
        with pytest.raises(SystemExit):
            main()
    shown = " ".join(capsys.readouterr().out.split())
    for report in (
        "rolling_update.json",
        "decoders_results.md",
        "tracing_overhead.json",
        "optimization.md",
    ):
        assert f"{results / report}" in shown, report


def test_lone_request_design_study_writes_its_table(tiny_model_path, tmp_path):
    from bench import lone_request

    assert lone_request.handoff_us((1, 1, 28, 28), rounds=50) > 0
    assert (
        lone_request.main(
            ["--models", str(tiny_model_path), "--duration", "0.2", "--out", str(tmp_path)]
        )
        == 0
    )
    text = (tmp_path / "lone_request.md").read_text()
    assert "| design 2 / design 1 |" in text and " us | " in text


def test_process_group_cpu_counts_this_process():
    from bench.cpu import process_group_cpu

    before = process_group_cpu(os.getpgrp())
    sum(i * i for i in range(2_000_000))  # some CPU of our own
    assert process_group_cpu(os.getpgrp()) > before
    assert process_group_cpu(2**22 + 12345) == 0.0  # no such group


def test_a_short_cpu_run_against_another_tree_writes_the_report(tiny_model_path, tmp_path):
    """``python -m bench cpu --compare-tree``: a fixed number of requests per point, both trees
    (here the same checkout twice), alternating rounds, the server's CPU per request."""
    import json
    from pathlib import Path

    from bench.__main__ import main

    tree = str(Path(__file__).resolve().parents[1])
    args = ["cpu", "--models", str(tiny_model_path), "--workers", "1", "--requests", "200"]
    args += ["--rounds", "2", "--warmup", "0.1", "--endpoints", "classify,oip"]
    args += ["--compare-tree", tree, "--out", str(tmp_path)]
    assert main(args) == 0
    (model,) = json.loads((tmp_path / "cpu_results.json").read_text())["models"]
    assert len(model["points"]) == 2 * 2 * 2  # rounds x trees x endpoints
    assert all(p["answered"] == 200 and p["errors"] == 0 for p in model["points"])
    assert all(p["server_cpu_us_per_req"] > 0 for p in model["points"])
    assert [row["endpoint"] for row in model["summary"]] == ["classify", "oip"]
    assert all(len(row["cpu_ratios"]) == 2 for row in model["summary"])
    assert "| classify | 2 |" not in (tmp_path / "cpu_results.md").read_text()
    assert "| classify | 32 |" in (tmp_path / "cpu_results.md").read_text()
