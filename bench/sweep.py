"""``python -m bench sweep`` (the default): raw ORT, then a concurrency sweep against a real
server, then the report.

For each model: measure raw ONNX Runtime in-process at batch 1 and the server's max batch,
start ``python -m service`` on loopback with the given settings, run a closed-loop point per
concurrency level and open-loop points at fractions of the best closed-loop rate, stop the
server, and check the targets. Writes ``docs/results/bench_results.md``,
``docs/results/bench_results.json`` and ``docs/results/bench_<model>.png``.

Every point is bounded by ``--duration`` and ``--max-requests``; the whole run by their sum.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import harness, loadgen, raw_ort, report
from bench.harness import Args, Workload
from bench.models import BenchModel
from bench.targets import add_endpoint_argument, target_for

log = harness.log

DEFAULTS: dict[str, Any] = {
    "models": "default,int8,224",
    "concurrency": [1, 2, 4, 8, 16, 32, 64],
    "duration": 5.0,
    "warmup": 1.0,
    "raw_duration": 3.0,
    "open_fractions": [0.5, 0.8],
}
QUICK: dict[str, Any] = {
    "concurrency": [1, 8, 32],
    "duration": 2.0,
    "warmup": 0.5,
    "raw_duration": 1.5,
    "open_fractions": [0.5],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_endpoint_argument(p)
    p.add_argument(
        "--open-fractions",
        type=harness.floats,
        help="open-loop rates as fractions of the best closed-loop req/s (0.5,0.8; '' for none)",
    )
    p.add_argument("--fixed-interval", action="store_true", help="open loop without Poisson")
    p.add_argument("--raw-duration", type=float, help="seconds per raw ORT batch (3)")
    p.add_argument(
        "--raw-batches",
        type=harness.ints,
        default=[8],
        help="raw ORT batch sizes besides 1 and the server's max batch",
    )


def load_seconds(args: Args) -> float:
    points = len(args.concurrency) + len(args.open_fractions)
    return points * (args.duration + args.warmup) + (len(args.raw_batches) + 2) * args.raw_duration


def check_targets(model: BenchModel, raw: list[dict], points: list[dict]) -> list[dict]:
    closed = {p["concurrency"]: p for p in points if p["mode"] == "closed"}
    raw_by_batch = {r["batch"]: r for r in raw}
    # The yardstick is the best batch size, whichever it is: at 224 px a large batch can be
    # slower per image than a small one (activations no longer fit in cache).
    best = max(raw, key=lambda r: r["images_per_s"])
    out = []
    if model.key == "224":
        if 32 in closed:
            ratio = closed[32]["req_per_s"] / best["images_per_s"]
            out.append(
                {
                    "target": ">= 0.90x raw ORT throughput at concurrency 32",
                    "measured": f"{ratio:.2f}x ({closed[32]['req_per_s']:.1f} req/s vs "
                    f"{best['images_per_s']:.1f} img/s at batch {best['batch']})",
                    "met": ratio >= 0.90,
                }
            )
        if 1 in closed and 1 in raw_by_batch:
            limit = raw_by_batch[1]["batch_latency_ms_p50"] + 2.0
            p50 = closed[1]["p50_ms"]
            out.append(
                {
                    "target": "p50 at concurrency 1 <= raw single-image latency + 2 ms",
                    "measured": f"{p50:.2f} ms vs {limit:.2f} ms",
                    "met": p50 <= limit,
                }
            )
    elif model.key == "default" and 32 in closed:
        c32 = closed[32]
        out.append(
            {
                "target": ">= 1100 req/s at concurrency 32",
                "measured": f"{c32['req_per_s']:.1f} req/s",
                "met": c32["req_per_s"] >= 1100,
            }
        )
        out.append(
            {
                "target": "p99 <= 80 ms at concurrency 32",
                "measured": f"{c32['p99_ms']:.2f} ms",
                "met": c32["p99_ms"] <= 80,
            }
        )
    return out


def run_model(model: BenchModel, args: Args, env: dict[str, str]) -> dict[str, Any]:
    settings = harness.settings_for(model, env)
    batches = sorted(
        {b for b in args.raw_batches if b <= settings.max_batch_size} | {1, settings.max_batch_size}
    )
    log.info("%s: raw ORT at batch %s", model.title, batches)
    raw = [raw_ort.measure(settings, b, duration_s=args.raw_duration).summary() for b in batches]
    for r in raw:
        log.info("  raw batch %(batch)d: %(images_per_s).1f img/s", r)

    with harness.serve(model, env, args) as server:
        target = target_for(model, server.host, server.port, args.endpoint)
        closed = harness.probe_and_sweep(server, target, args)
        points: list[dict[str, Any]] = [r.summary() for r in closed]
        peak = harness.capacity(closed)
        for fraction in args.open_fractions:
            rate = peak * fraction
            if rate <= 0:
                continue
            result = loadgen.run(
                loadgen.open_loop(
                    target,
                    rate=rate,
                    duration_s=args.duration,
                    max_requests=args.max_requests,
                    poisson=not args.fixed_interval,
                    timeout_s=args.timeout,
                )
            )
            points.append(result.summary())
            harness.log_point(points[-1])
    entry = {
        "key": model.key,
        "title": model.title,
        "path": str(model.path),
        "trained": model.trained,
        "raw": raw,
        "points": points,
        "targets": check_targets(model, raw, points),
    }
    harness.log_targets(entry["targets"])
    return entry


WORKLOAD = Workload(
    name="sweep",
    help="raw ORT, then closed-loop concurrency levels and open-loop rates (the default)",
    description=__doc__,
    add_arguments=add_arguments,
    run_model=run_model,
    markdown=report.markdown,
    load_seconds=load_seconds,
    defaults=DEFAULTS,
    quick=QUICK,
    report_name="bench",
    plot=report.plot,
)
