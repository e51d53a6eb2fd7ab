"""``python -m bench cpu``: the server's CPU per request, for a fixed number of requests.

Throughput on a shared 2-core machine swings with whatever else runs; the CPU time the server's
processes spent per request answered hardly does. So each point sends exactly ``--requests``
requests (closed loop, ``--concurrency``, default 32) and reads the user + system time of every
process in the server's process group (the supervisor and its workers, all their threads)
from ``/proc`` before and after: the difference over the requests answered is what one request
costs the server, the model run included. The load generator's own CPU is reported beside it.

``--compare-tree DIR`` serves the same model from another checkout too (say the commit before a
change): both servers stay up, and the rounds alternate between them (compare tree first), so
both see the same machine noise; the report gives each round's figures and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench import harness, loadgen, report
from bench.harness import Args, Workload
from bench.models import BenchModel
from bench.photos import service_module
from bench.server import ServerProcess, group_stat_fields
from bench.targets import ENDPOINTS, target_for

log = harness.log

DEFAULT_REQUESTS = 20_000
DEFAULTS: dict[str, Any] = {
    "models": "default",
    "concurrency": [32],
    # Only bounds a point in time: a point ends after --requests, or after this many seconds.
    "duration": 120.0,
    "warmup": 1.0,
}
QUICK: dict[str, Any] = {"duration": 30.0, "warmup": 0.5}
#: Requests a point sends unless ``--requests`` says otherwise (``--quick``: a tenth).
QUICK_REQUESTS = 2_000


def process_group_cpu(pgid: int) -> float:
    """CPU seconds (user + system, every thread) of every live process in ``pgid``."""
    # utime and stime are fields 14 and 15 of stat.
    ticks = sum(int(f[11]) + int(f[12]) for f in group_stat_fields(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


def _endpoints(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ENDPOINTS]
    if bad or not values:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(ENDPOINTS)}, got {text!r}"
        )
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoints",
        type=_endpoints,
        default=["classify", "oip"],
        help=f"comma-separated, each one of {', '.join(ENDPOINTS)} (classify,oip)",
    )
    p.add_argument(
        "--requests",
        type=int,
        help=f"requests per point ({DEFAULT_REQUESTS:,}; --quick: {QUICK_REQUESTS:,})",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating trees (3)")
    p.add_argument(
        "--compare-tree",
        type=Path,
        help="also serve from this checkout, in rounds alternating with --server-tree (or "
        "this tree)",
    )


def check_args(parser: argparse.ArgumentParser, args: Args) -> None:
    if args.requests is None:
        args.requests = QUICK_REQUESTS if getattr(args, "quick", False) else DEFAULT_REQUESTS
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.compare_tree is not None and not (args.compare_tree / "service").is_dir():
        parser.error(f"--compare-tree {args.compare_tree}: no service/ package there")


def load_seconds(args: Args) -> float:
    trees = 2 if args.compare_tree else 1
    points = trees * args.rounds * len(args.endpoints) * len(args.concurrency)
    return points * (args.duration + args.warmup)


def environment(args: Args) -> dict[str, Any]:
    return {
        "requests": args.requests,
        "rounds": args.rounds,
        "compare_tree": str(args.compare_tree) if args.compare_tree else None,
        "service_module": service_module(args.server_tree),
        "compare_service_module": (
            service_module(args.compare_tree) if args.compare_tree else None
        ),
    }


def measure(
    server: ServerProcess, target: loadgen.Target, concurrency: int, args: Args
) -> dict[str, Any]:
    """A warm-up, then exactly ``--requests`` requests with the server's CPU read around them."""
    assert server.proc is not None
    pgid = server.proc.pid  # the server runs in a session (and process group) of its own
    if args.warmup > 0:
        loadgen.run(
            loadgen.closed_loop(
                target, concurrency=concurrency, duration_s=args.warmup, timeout_s=args.timeout
            )
        )
    cpu0 = process_group_cpu(pgid)
    wall0 = time.perf_counter()
    result = loadgen.run(
        loadgen.closed_loop(
            target,
            concurrency=concurrency,
            duration_s=args.duration,
            max_requests=args.requests,
            timeout_s=args.timeout,
        )
    )
    wall = time.perf_counter() - wall0
    server_cpu = process_group_cpu(pgid) - cpu0
    answered = result.ok + sum(n for kind, n in result.errors.items() if kind.startswith("http_"))
    summary = result.summary()
    return {
        "concurrency": concurrency,
        "requests": result.total,
        "answered": answered,
        "errors": summary["errors"],
        "error_kinds": summary["error_kinds"],
        "req_per_s": summary["req_per_s"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_us_per_req": round(server_cpu / answered * 1e6, 1) if answered else None,
        "server_cores": round(server_cpu / wall, 2) if wall > 0 else None,
        "client_cpu_us_per_req": summary["client_cpu_us_per_req"],
    }


def _label(tree: Path | None) -> str:
    return str(tree) if tree else "this tree"


def run_model(model: BenchModel, args: Args, env: dict[str, str]) -> dict[str, Any]:
    """Every endpoint and concurrency per round; with a compare tree, A B A B rounds against
    two servers that stay up (the idle one costs nothing: each is measured by its own group)."""
    trees: list[Path | None] = (
        [args.compare_tree, args.server_tree] if args.compare_tree else [args.server_tree]
    )
    points = []
    with contextlib.ExitStack() as stack:
        servers = {
            _label(tree): stack.enter_context(harness.serve(model, env, args, tree=tree))
            for tree in trees
        }
        for r in range(args.rounds):
            for label, server in servers.items():
                for endpoint in args.endpoints:
                    target = target_for(model, server.host, server.port, endpoint)
                    if r == 0:
                        harness.probe(server, target, args.timeout)
                    for c in args.concurrency:
                        point = {
                            "round": r + 1,
                            "tree": label,
                            "endpoint": endpoint,
                            **measure(server, target, c, args),
                        }
                        points.append(point)
                        log.info(
                            "  round %d %s %s c=%d: %s us/req server CPU (%.2f cores), "
                            "%.0f req/s, client %.0f us/req, errors %d",
                            r + 1,
                            label,
                            endpoint,
                            c,
                            point["server_cpu_us_per_req"],
                            point["server_cores"] or 0.0,
                            point["req_per_s"],
                            point["client_cpu_us_per_req"],
                            point["errors"],
                        )
    return {
        "key": model.key,
        "title": model.title,
        "path": str(model.path),
        "points": points,
        "summary": summarize(points, _label(args.compare_tree) if args.compare_tree else None),
    }


def summarize(points: list[dict[str, Any]], compare: str | None) -> list[dict[str, Any]]:
    """Per (endpoint, concurrency): each tree's per-round figures and medians, and this tree's
    CPU per request over the compare tree's (within each round, then the median)."""
    rows = []
    keys = sorted({(p["endpoint"], p["concurrency"]) for p in points})
    for endpoint, c in keys:
        row: dict[str, Any] = {"endpoint": endpoint, "concurrency": c}
        for p in points:
            if (p["endpoint"], p["concurrency"]) != (endpoint, c):
                continue
            side = row.setdefault("compare" if p["tree"] == compare else "this", {})
            for key in ("server_cpu_us_per_req", "req_per_s", "client_cpu_us_per_req", "errors"):
                side.setdefault(key, []).append(p[key])
        for side in (row.get("this"), row.get("compare")):
            if side:
                for key in ("server_cpu_us_per_req", "req_per_s", "client_cpu_us_per_req"):
                    values = [v for v in side[key] if v is not None]
                    side[f"median_{key}"] = statistics.median(values) if values else None
        if "this" in row and "compare" in row:
            pairs = zip(
                row["this"]["server_cpu_us_per_req"],
                row["compare"]["server_cpu_us_per_req"],
                strict=False,
            )
            ratios = [round(a / b, 3) for a, b in pairs if a and b]
            if ratios:
                row["cpu_ratios"] = ratios
                row["cpu_ratio"] = round(statistics.median(ratios), 3)
        rows.append(row)
    return rows


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    compare = env.get("compare_tree")
    lines = [
        *report.header("Server CPU per request", env),
        f"- The measured server imports `{env['service_module']}`"
        + (f"; the compare tree's `{env['compare_service_module']}`." if compare else "."),
        f"- {env['requests']:,} requests per point after {env['warmup_s']:g} s of warm-up, closed "
        f"loop; {env['rounds']} rounds"
        + (" alternating between the two servers (compare tree first)." if compare else ".")
        + " Server CPU is user + system time of every process of the server (supervisor, "
        "workers, all threads) over the requests answered, the model run included; client CPU "
        "is the load generator's, which shares the cores.",
        "",
    ]
    for model in results["models"]:
        lines += [f"## {model['title']}", ""]
        if compare:
            lines += [
                "| endpoint | c | server CPU µs/req, compare tree | server CPU µs/req, measured "
                "tree | ratio per round | median ratio | req/s, compare | req/s, measured | "
                "client CPU µs/req (measured) | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                "| endpoint | c | server CPU µs/req per round | median | req/s per round | "
                "client CPU µs/req (median) | errors |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
        for row in model["summary"]:
            this = row.get("this", {})
            if compare:
                other = row.get("compare", {})
                lines.append(
                    f"| {row['endpoint']} | {row['concurrency']} | "
                    f"{report.runs(other.get('server_cpu_us_per_req', []))} | "
                    f"{report.runs(this.get('server_cpu_us_per_req', []))} | "
                    f"{report.runs(row.get('cpu_ratios', []), 2)} | "
                    f"**{row.get('cpu_ratio', float('nan')):.2f}x** | "
                    f"{report.runs(other.get('req_per_s', []))} | "
                    f"{report.runs(this.get('req_per_s', []))} | "
                    f"{this.get('median_client_cpu_us_per_req') or 0:,.0f} | "
                    f"{sum(other.get('errors', [])) + sum(this.get('errors', []))} |"
                )
            else:
                lines.append(
                    f"| {row['endpoint']} | {row['concurrency']} | "
                    f"{report.runs(this['server_cpu_us_per_req'])} | "
                    f"**{this['median_server_cpu_us_per_req'] or 0:,.0f}** | "
                    f"{report.runs(this['req_per_s'])} | "
                    f"{this['median_client_cpu_us_per_req'] or 0:,.0f} | {sum(this['errors'])} |"
                )
        lines.append("")
    return "\n".join(lines)


WORKLOAD = Workload(
    name="cpu",
    help="the server's CPU per request over a fixed number of requests, optionally A/B "
    "against another tree",
    description=__doc__,
    add_arguments=add_arguments,
    run_model=run_model,
    markdown=markdown,
    load_seconds=load_seconds,
    defaults=DEFAULTS,
    quick=QUICK,
    check_args=check_args,
    environment=environment,
)
