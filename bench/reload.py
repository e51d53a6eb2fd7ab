"""``python -m bench reload``: models that change while the server serves, under load.

For each model, a repository in a temporary folder holds it as version 1 of the model ``bench``
(the default latest-1 policy) and as a second model, ``extra``. The server serves the
repository (``SEPCONV_MODEL_REPOSITORY``, default workers), and ``--concurrency`` closed-loop
clients send images to ``/v1/classify?model=bench`` throughout:

1. **steady**: ``--duration`` seconds with nothing changing: the reference latency;
2. **swaps**: ``--swaps`` new versions, ``--interval`` seconds apart, each copied into the
   repository (written to a temporary name, then renamed) and brought in by
   ``POST /v2/repository/models/bench/load`` (phase ``api``) or by the server's own polling
   (phase ``polling``, a second server with ``SEPCONV_REPOSITORY_POLL_S``); each new version
   replaces the one before (the policy unloads it once its requests are answered). In the api
   phase, ``extra`` is unloaded through the API as well.

Every answer that is not a 200 is counted, and the latency of the swap window is set against the
steady one. Then, with no load, ``--cycles`` unload/load cycles of ``bench`` through the API with
the server's RSS read after each: the memory a load leaves behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import harness, loadgen
from bench.harness import Args, Workload
from bench.models import BenchModel, image_format, sample_images
from bench.overload import RssSampler, process_group_rss
from bench.server import ServerProcess

log = harness.log

NAME = "bench"
EXTRA = "extra"
DEFAULTS: dict[str, Any] = {
    "models": "224",
    "concurrency": [32],
    "duration": 10.0,
    "warmup": 1.0,
    "swaps": 10,
    "interval": 2.0,
    "poll": 0.5,
    "cycles": 50,
}
QUICK: dict[str, Any] = {"duration": 3.0, "swaps": 3, "interval": 1.0, "cycles": 5}
#: RSS after the load/unload cycles, as a share of where it started (the issue's target).
RSS_GROWTH_LIMIT = 0.10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--swaps", type=int, help="new versions per phase (10)")
    p.add_argument("--interval", type=float, help="seconds between swaps (2)")
    p.add_argument(
        "--poll", type=float, help="SEPCONV_REPOSITORY_POLL_S of the polling phase (0.5)"
    )
    p.add_argument("--cycles", type=int, help="unload/load cycles for the memory curve (50)")
    p.add_argument(
        "--phases",
        default="api,polling",
        help="swap phases to run: api, polling or both (api,polling)",
    )


def load_seconds(args: Args) -> float:
    phases = len(_phases(args))
    return (
        phases * (args.warmup + args.duration + args.swaps * (args.interval + 5)) + args.cycles * 4
    )


def _phases(args: Args) -> list[str]:
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - {"api", "polling"}
    if unknown or not phases:
        raise SystemExit(f"--phases: api, polling or both, got {args.phases!r}")
    return phases


# --- the repository and its control -----------------------------------------------------------


def place(repo: Path, name: str, version: int, source: Path) -> None:
    """``source`` as ``repo/name/version/model.onnx``, renamed into place whole."""
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.onnx.partial"
    shutil.copyfile(source, tmp)
    tmp.replace(folder / "model.onnx")


def _post(url: str, timeout_s: float = 120.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def index(server: ServerProcess) -> list[dict[str, str]]:
    return _post(f"{server.base_url}/v2/repository/index")[1]


def refusal_reasons(server: ServerProcess) -> dict[str, float]:
    """Images the server refused or gave up on, by reason, from its own metrics."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    reasons: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sepconv_batch_rejected_total{"):
            labels, _, value = line.rpartition(" ")
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            reasons[reason] = reasons.get(reason, 0.0) + float(value)
    return reasons


def _wait_ready_version(server: ServerProcess, version: int, timeout_s: float) -> bool:
    """True once ``bench`` version ``version`` is READY everywhere and alone."""
    deadline = time.monotonic() + timeout_s
    want = [(NAME, str(version), "READY")]
    while time.monotonic() < deadline:
        entries = [
            (e["name"], e["version"], e["state"]) for e in index(server) if e["name"] == NAME
        ]
        if entries == want:
            return True
        time.sleep(0.05)
    return False


# --- one phase ----------------------------------------------------------------------------------


def _swap(
    server: ServerProcess, repo: Path, model: BenchModel, phase: str, args: Args, first: int
) -> list[dict[str, Any]]:
    """The phase's swaps, one every ``--interval`` seconds; what each took."""
    swaps = []
    for version in range(first, first + args.swaps):
        time.sleep(args.interval)
        started = time.monotonic()
        place(repo, NAME, version, model.path)
        if phase == "api":
            status, body = _post(f"{server.base_url}/v2/repository/models/{NAME}/load")
            ok = status == 200 and _wait_ready_version(server, version, 5.0)
        else:
            status, body = None, None
            ok = _wait_ready_version(server, version, 60.0)
        swaps.append(
            {
                "version": version,
                "ok": ok,
                "status": status,
                "error": None if ok else (body or "not READY in time"),
                "seconds": round(time.monotonic() - started, 3),
            }
        )
        log.info(
            "  %s: version %d %s in %.2f s",
            phase,
            version,
            "READY" if ok else "FAILED",
            swaps[-1]["seconds"],
        )
    if phase == "api":
        status, body = _post(f"{server.base_url}/v2/repository/models/{EXTRA}/unload")
        swaps.append(
            {"unload": EXTRA, "ok": status == 200, "status": status, "error": body or None}
        )
        log.info("  api: %s unloaded (%s)", EXTRA, status)
    return swaps


def _phase(
    model: BenchModel, args: Args, env: dict[str, str], phase: str, workdir: Path
) -> dict[str, Any]:
    repo = workdir / phase
    place(repo, NAME, 1, model.path)
    place(repo, EXTRA, 1, model.path)
    settings = {**env, "SEPCONV_MODEL_REPOSITORY": str(repo)}
    if phase == "polling":
        settings["SEPCONV_REPOSITORY_POLL_S"] = str(args.poll)
    log_path = workdir / f"server-{phase}.log"
    with ServerProcess(None, settings, log_path, cwd=args.server_tree) as server:
        assert server.proc is not None
        fmt, content_type = image_format(model.spec)
        target = loadgen.Target(
            server.host,
            server.port,
            f"/v1/classify?model={NAME}",
            tuple(sample_images(model.spec)),
            content_type=content_type,
        )
        concurrency = args.concurrency[0]
        harness.probe(server, target, args.timeout)
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        try:
            sampler.mark("steady")
            steady = harness.closed_point(target, concurrency, args)
            harness.log_point(steady.summary(), f"{phase} steady")
            sampler.mark("swaps")
            done = threading.Event()
            swaps: list[dict[str, Any]] = []

            def swapping() -> None:
                try:
                    swaps.extend(_swap(server, repo, model, phase, args, first=2))
                finally:
                    done.set()

            thread = threading.Thread(target=swapping, name=f"{phase}-swaps")
            thread.start()
            during = loadgen.run(
                loadgen.closed_loop(
                    target,
                    concurrency=concurrency,
                    duration_s=load_seconds(args),
                    timeout_s=args.timeout,
                    stop=done,
                )
            )
            thread.join()
            harness.log_point(during.summary(), f"{phase} swaps ")
            entries = index(server)
            refused = refusal_reasons(server)
        finally:
            sampler.stop()
    return {
        "phase": phase,
        "steady": steady.summary(),
        "swaps_window": during.summary(),
        "swaps": swaps,
        "index_after": entries,
        "refusal_reasons": refused,
        "non_200": steady.error_count + during.error_count,
        "error_kinds": dict(steady.errors + during.errors),
        "p99_ratio": round(during.latency_ms(99) / steady.latency_ms(99), 2),
        "rss_curve": [(round(t, 2), round(b / 2**20, 1)) for t, b in sampler.samples],
        "rss_marks": [(round(t, 2), label) for t, label in sampler.marks],
    }


def _cycles(model: BenchModel, args: Args, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """``--cycles`` unload/load cycles with nothing else going on; RSS after each."""
    repo = workdir / "cycles"
    place(repo, NAME, 1, model.path)
    settings = {**env, "SEPCONV_MODEL_REPOSITORY": str(repo)}
    with ServerProcess(
        None, settings, workdir / "server-cycles.log", cwd=args.server_tree
    ) as server:
        assert server.proc is not None
        pgid = server.proc.pid
        start = process_group_rss(pgid)
        rss, failures = [], 0
        for cycle in range(args.cycles):
            unloaded = _post(f"{server.base_url}/v2/repository/models/{NAME}/unload")[0]
            loaded = _post(f"{server.base_url}/v2/repository/models/{NAME}/load")[0]
            failures += (unloaded, loaded) != (200, 200)
            rss.append(process_group_rss(pgid))
            if (cycle + 1) % 10 == 0:
                log.info("  cycle %d: RSS %.0f MB", cycle + 1, rss[-1] / 2**20)
    end = statistics.median(rss[-5:]) if rss else start
    return {
        "cycles": args.cycles,
        "failures": failures,
        "rss_start_mb": round(start / 2**20, 1),
        "rss_end_mb": round(end / 2**20, 1),
        "rss_max_mb": round(max(rss, default=start) / 2**20, 1),
        "growth": round(end / start - 1, 4) if start else None,
        "rss_mb": [round(b / 2**20, 1) for b in rss],
    }


def run_model(model: BenchModel, args: Args, env: dict[str, str]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sepconv-bench-reload-"))
    try:
        phases = [_phase(model, args, env, phase, workdir) for phase in _phases(args)]
        memory = _cycles(model, args, env, workdir) if args.cycles else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    entry = {"key": model.key, "title": model.title, "path": str(model.path), "phases": phases}
    entry["memory"] = memory
    entry["targets"] = check_targets(entry)
    harness.log_targets(entry["targets"])
    return entry


def check_targets(entry: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for phase in entry["phases"]:
        failed = [s for s in phase["swaps"] if not s["ok"]]
        requests = phase["steady"]["requests"] + phase["swaps_window"]["requests"]
        targets.append(
            {
                "target": f"{phase['phase']}: no answer other than 200 while swapping",
                "measured": f"{phase['non_200']} of {requests}",
                "met": phase["non_200"] == 0,
            }
        )
        targets.append(
            {
                "target": f"{phase['phase']}: every swap done",
                "measured": f"{len(phase['swaps']) - len(failed)} of {len(phase['swaps'])}",
                "met": not failed,
            }
        )
    memory = entry.get("memory")
    if memory:
        targets.append(
            {
                "target": f"RSS after {memory['cycles']} load/unload cycles within "
                f"{RSS_GROWTH_LIMIT:.0%} of the start",
                "measured": f"{memory['rss_start_mb']} -> {memory['rss_end_mb']} MB "
                f"({memory['growth']:+.1%})",
                "met": memory["growth"] is not None and abs(memory["growth"]) <= RSS_GROWTH_LIMIT,
            }
        )
    return targets


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Models that change under load",
        "",
        f"Generated by `{env['command']}` on {env['date']} ({env['cpu']}, {env['cores']} cores).",
        "",
    ]
    for model in results["models"]:
        lines += [
            f"## {model['title']}",
            "",
            "| phase | window | requests | non-200 | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for phase in model["phases"]:
            for label, point in (("steady", phase["steady"]), ("swaps", phase["swaps_window"])):
                lines.append(
                    f"| {phase['phase']} | {label} | {point['requests']} | {point['errors']} | "
                    f"{point['req_per_s']} | {point['p50_ms']} | {point['p99_ms']} |"
                )
        lines += [
            "",
            "| phase | swaps done | seconds per swap (median, max) | p99 swaps / steady |",
            "|---|---|---|---|",
        ]
        for phase in model["phases"]:
            seconds = [s["seconds"] for s in phase["swaps"] if "seconds" in s]
            done = sum(1 for s in phase["swaps"] if s["ok"])
            lines.append(
                f"| {phase['phase']} | {done} of {len(phase['swaps'])} | "
                f"{statistics.median(seconds):.2f}, {max(seconds):.2f} | {phase['p99_ratio']}x |"
            )
        memory = model.get("memory")
        if memory:
            lines += [
                "",
                f"Memory: {memory['cycles']} unload/load cycles with no load: RSS "
                f"{memory['rss_start_mb']} MB before, {memory['rss_end_mb']} MB after "
                f"(median of the last 5), at most {memory['rss_max_mb']} MB; "
                f"{memory['failures']} failed calls.",
            ]
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
            for t in model["targets"]
        ]
        lines.append("")
    return "\n".join(lines)


def plot_rss(model: dict[str, Any], path: Path) -> None:
    """RSS after each unload/load cycle (left) and through each swap phase (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    memory = model.get("memory")
    if memory:
        axes[0].plot(range(1, len(memory["rss_mb"]) + 1), memory["rss_mb"], marker=".", lw=1)
        axes[0].axhline(memory["rss_start_mb"], color="grey", ls="--", lw=0.8)
        axes[0].axhspan(
            memory["rss_start_mb"] * (1 - RSS_GROWTH_LIMIT),
            memory["rss_start_mb"] * (1 + RSS_GROWTH_LIMIT),
            color="green",
            alpha=0.08,
        )
        axes[0].set_xlabel("unload/load cycle")
        axes[0].set_ylabel("server RSS (MB)")
        axes[0].set_title("memory after each cycle (band: start +/- 10%)")
        axes[0].set_ylim(0, max(memory["rss_mb"] + [memory["rss_start_mb"]]) * 1.2)
    for phase in model["phases"]:
        axes[1].plot(
            [t for t, _ in phase["rss_curve"]],
            [mb for _, mb in phase["rss_curve"]],
            lw=1,
            label=phase["phase"],
        )
    axes[1].set_xlabel("seconds (steady, then swaps)")
    axes[1].set_title("memory under load while swapping")
    axes[1].set_ylim(bottom=0)
    axes[1].legend()
    fig.suptitle(f"{model['key']} model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


WORKLOAD = Workload(
    name="reload",
    help="new versions loaded under load through the API and polling (non-200s, p99 during "
    "swaps against steady), then RSS over load/unload cycles",
    description=__doc__,
    add_arguments=add_arguments,
    run_model=run_model,
    markdown=markdown,
    load_seconds=load_seconds,
    defaults=DEFAULTS,
    quick=QUICK,
    plot=plot_rss,
    plot_suffix="_rss",
)
