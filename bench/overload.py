"""``python -m bench overload``: what the server does when offered more than it can serve.

Per model: measure capacity (the best closed-loop point of ``--concurrency``, 32 unless set),
then offer open-loop load (Poisson, latency counted from each scheduled send) at ``--factors``
multiples of it, and report goodput (answers per second that were 200s), the accepted
requests' p50/p99, how fast refusals come (p99), the 504s, and the server's resident memory
sampled all along (every worker process summed), including after the load stops.
``--soak SECONDS`` adds one long run at the first factor, for the RSS curve.

``--storm N`` adds a closed loop of N clients that resend the moment they are answered,
refused or not (what ``hey -c N`` does, ignoring ``Retry-After``): the retry storm an open loop
never shows, since every refusal there is one request less instead of one more. Its point also
gives the CPU the server's processes and the load generator took during the storm (they share
the cores). ``--factors none`` measures the capacity and the storm only.

The load generator shares the machine's cores with the server: at high offered rates it may not
keep its schedule, which the ``late sends`` column shows (a late send is one the client itself
started more than 1 ms after its scheduled time).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench import harness, hey, loadgen, raw_ort, report
from bench.cpu import process_group_cpu
from bench.harness import Args, Workload
from bench.models import BenchModel
from bench.server import group_stat_fields
from bench.targets import add_endpoint_argument, target_for

log = harness.log

DEFAULT_FACTORS = (2.0, 4.0, 8.0)
DEFAULT_STORM = 256
DEFAULTS: dict[str, Any] = {
    "models": "default,int8,224",
    "concurrency": [32],
    "duration": 5.0,
    "warmup": 1.0,
    "raw_duration": 3.0,
}
QUICK: dict[str, Any] = {"duration": 2.0, "warmup": 0.5, "raw_duration": 1.5}
#: Targets from the issue, per model.
GOODPUT_FRACTION_AT_4X = 0.90
REFUSAL_P99_MS = 5.0
RSS_INTERVAL_S = 0.5


def process_group_rss(pgid: int) -> int:
    """Resident bytes of every process in ``pgid`` (the server and its workers)."""
    # rss (pages) is field 24 of stat.
    return sum(int(f[21]) for f in group_stat_fields(pgid)) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Samples a process group's RSS every ``interval_s`` until stopped: (seconds, bytes)."""

    def __init__(self, pgid: int, interval_s: float = RSS_INTERVAL_S) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pgid = pgid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - self._t0, process_group_rss(self.pgid)))
            self._halt.wait(self.interval_s)

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self._t0, label))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak_between(self, start: float, end: float) -> int:
        return max((b for t, b in self.samples if start <= t <= end), default=0)

    def now(self) -> float:
        return time.monotonic() - self._t0


def _point(result: loadgen.RunResult, factor: float, rate: float, capacity: float) -> dict:
    summary = result.summary()
    kinds = summary["error_kinds"]
    return {
        "factor": factor,
        "offered_per_s": round(rate, 1),
        "sent_per_s": round(result.total / result.duration_s, 1) if result.duration_s else 0.0,
        "goodput_per_s": summary["req_per_s"],
        "goodput_fraction": round(summary["req_per_s"] / capacity, 3) if capacity else 0.0,
        "accepted_p50_ms": summary["p50_ms"],
        "accepted_p99_ms": summary["p99_ms"],
        "refused": summary["refused"],
        "refused_p99_ms": summary["refused_p99_ms"],
        "refused_wire_p99_ms": summary["refused_wire_p99_ms"],
        "http_429": kinds.get("http_429", 0),
        "http_504": kinds.get("http_504", 0),
        "other_errors": sum(v for k, v in kinds.items() if k not in ("http_429", "http_504")),
        "error_kinds": kinds,
        "late_sends": summary["late_sends"],
        "client_cpu_us_per_req": summary["client_cpu_us_per_req"],
    }


def check_targets(entry: dict) -> list[dict]:
    budget_ms = entry["budget_ms"]
    batch_ms = entry["full_batch_ms"]
    out = []
    at4 = next((p for p in entry["points"] if p["factor"] == 4.0), None)
    if at4 is not None:
        out.append(
            {
                "target": f">= {GOODPUT_FRACTION_AT_4X:.0%} of capacity as goodput at 4x",
                "measured": f"{at4['goodput_fraction']:.2f}x ({at4['goodput_per_s']:.1f} of "
                f"{entry['capacity_per_s']:.1f} req/s)",
                "met": at4["goodput_fraction"] >= GOODPUT_FRACTION_AT_4X,
            }
        )
        out.append(
            {
                "target": "no 504 at 4x",
                "measured": f"{at4['http_504']} x 504",
                "met": at4["http_504"] == 0,
            }
        )
    for p in entry["points"]:
        limit = budget_ms + batch_ms
        out.append(
            {
                "target": f"accepted p99 <= budget + one batch ({limit:.1f} ms) at "
                f"{p['factor']:g}x",
                "measured": f"{p['accepted_p99_ms']:.1f} ms",
                "met": p["accepted_p99_ms"] <= limit,
            }
        )
        if p["refused"]:
            out.append(
                {
                    "target": f"refusals p99 <= {REFUSAL_P99_MS:g} ms at {p['factor']:g}x",
                    "measured": f"{p['refused_p99_ms']:.2f} ms from the schedule "
                    f"({p['refused_wire_p99_ms']:.2f} ms from the write)",
                    "met": p["refused_p99_ms"] <= REFUSAL_P99_MS,
                }
            )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_endpoint_argument(p)
    p.add_argument("--raw-duration", type=float, help="seconds of raw ORT at the max batch (3)")
    p.add_argument(
        "--factors",
        type=_factors,
        default=list(DEFAULT_FACTORS),
        help="multiples of the measured capacity to offer (2,4,8); 'none': capacity and the "
        "storm only",
    )
    p.add_argument("--factor-duration", type=float, default=10.0, help="seconds per factor (10)")
    p.add_argument("--connections", type=int, default=1024, help="open-loop connection cap (1024)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="capacity and every factor this many times; the median is reported (1)",
    )
    p.add_argument(
        "--storm",
        type=int,
        default=DEFAULT_STORM,
        help=f"closed-loop clients that resend at once, refused or not ({DEFAULT_STORM}; 0: none)",
    )
    p.add_argument(
        "--storm-client",
        choices=("loadgen", "hey"),
        default="loadgen",
        help="what sends the storm: our load generator, or hey (the issues' tool, about ten "
        "times our CPU per request, taken from the same cores) (loadgen)",
    )
    p.add_argument("--pause", type=float, default=2.0, help="idle seconds between loads (2)")
    p.add_argument("--idle", type=float, default=5.0, help="idle seconds at the end (5)")
    p.add_argument(
        "--soak", type=float, default=0.0, help="then SECONDS more at the first factor (RSS curve)"
    )


def _factors(text: str) -> list[float]:
    return [] if text.strip().lower() == "none" else harness.floats(text)


def check_args(parser: argparse.ArgumentParser, args: Args) -> None:
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.factors and min(args.factors) <= 0:
        parser.error("--factors must be positive numbers")
    if not args.factors and not args.storm:
        parser.error("--factors none needs a --storm")
    if args.soak and not args.factors:
        parser.error("--soak runs at the first of --factors")
    if args.storm and args.storm_client == "hey" and not hey.available():
        parser.error("--storm-client hey: hey is not installed (Debian: apt-get install hey)")


def load_seconds(args: Args) -> float:
    loads = len(args.factors) * args.rounds + bool(args.storm)
    return (
        len(args.concurrency) * (args.duration + args.warmup) * args.rounds
        + args.raw_duration
        + loads * (args.factor_duration + args.pause)
        + args.soak
        + args.idle
    )


def _open_loop_point(
    target: loadgen.Target,
    args: Args,
    sampler: RssSampler,
    factor: float,
    capacity: float,
    seconds: float | None = None,
) -> dict:
    """``factor`` x ``capacity`` offered for ``seconds`` (``--factor-duration``), then a
    pause for the queue to drain."""
    seconds = seconds or args.factor_duration
    rate = factor * capacity
    sampler.mark(f"{factor:g}x for {seconds:g} s")
    start = sampler.now()
    result = loadgen.run(
        loadgen.open_loop(
            target,
            rate=rate,
            duration_s=seconds,
            max_requests=math.ceil(rate * seconds) + 1,
            max_connections=args.connections,
            timeout_s=args.timeout,
        )
    )
    point = _point(result, factor, rate, capacity)
    point["seconds"] = seconds
    point["rss_peak_mb"] = round(sampler.peak_between(start, sampler.now()) / 2**20, 1)
    time.sleep(args.pause)
    return point


def _storm_point(target: loadgen.Target, args: Args, sampler: RssSampler, capacity: float) -> dict:
    """``--storm`` closed-loop clients that resend at once, refused or not; with the CPU the
    server and the load generator each took (cores, over the storm's wall time)."""
    sampler.mark(f"storm c={args.storm}")
    start = sampler.now()
    cpu0, wall0 = process_group_cpu(sampler.pgid), time.perf_counter()
    if args.storm_client == "hey":
        result = hey.closed_loop(target, concurrency=args.storm, duration_s=args.factor_duration)
    else:
        result = loadgen.run(
            loadgen.closed_loop(
                target,
                concurrency=args.storm,
                duration_s=args.factor_duration,
                timeout_s=args.timeout,
            )
        )
    wall = time.perf_counter() - wall0
    server_cpu = process_group_cpu(sampler.pgid) - cpu0
    storm = _point(result, 0.0, 0.0, capacity)
    storm.update(
        client=args.storm_client,
        clients=args.storm,
        seconds=args.factor_duration,
        refused_per_s=round(storm["refused"] / result.duration_s, 1),
        rss_peak_mb=round(sampler.peak_between(start, sampler.now()) / 2**20, 1),
        server_cores=round(server_cpu / wall, 2),
        client_cores=round(result.client_cpu_s / wall, 2),
        server_cpu_us_per_answer=round(server_cpu / result.total * 1e6, 1)
        if result.total
        else None,
    )
    _log_storm(storm)
    time.sleep(args.pause)
    return storm


def median_point(points: list[dict]) -> dict:
    """One point per factor over rounds: the median of every figure, and how many rounds."""
    out = dict(points[0])
    for key, value in points[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [p[key] for p in points if not math.isnan(p[key])]
            out[key] = statistics.median(values) if values else math.nan
    out["rounds"] = len(points)
    kinds: dict[str, int] = {}
    for p in points:
        for kind, n in p.get("error_kinds", {}).items():
            kinds[kind] = kinds.get(kind, 0) + n
    out["error_kinds"] = kinds  # summed over the rounds, not a median
    out["goodput_fraction_range"] = (
        min(p["goodput_fraction"] for p in points),
        max(p["goodput_fraction"] for p in points),
    )
    out["refused_p99_ms_range"] = (
        min(p["refused_p99_ms"] for p in points),
        max(p["refused_p99_ms"] for p in points),
    )
    return out


def run_model(model: BenchModel, args: Args, env: dict[str, str]) -> dict[str, Any]:
    """Capacity, then each overload factor, then an idle pause; RSS sampled throughout."""
    settings = harness.settings_for(model, env)
    full = raw_ort.measure(settings, settings.max_batch_size, duration_s=args.raw_duration)
    batch_ms = full.summary()["batch_latency_ms_p50"]
    log.info("%s: a full batch of %d takes %.1f ms", model.title, settings.max_batch_size, batch_ms)
    with harness.serve(model, env, args) as server:
        assert server.proc is not None
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        try:
            target = target_for(model, server.host, server.port, args.endpoint)
            capacities, rounds = [], []
            for r in range(args.rounds):
                sampler.mark(f"capacity, round {r + 1}" if args.rounds > 1 else "capacity")
                capacity = harness.capacity(
                    harness.probe_and_sweep(server, target, args, probe_first=not r)
                )
                capacities.append(capacity)
                log.info("  round %d: capacity %.1f req/s", r + 1, capacity)
                if not r:
                    rss_start = process_group_rss(server.proc.pid)
                for factor in args.factors:
                    point = _open_loop_point(target, args, sampler, factor, capacity)
                    rounds.append(point)
                    _log(point)
            points = [median_point([p for p in rounds if p["factor"] == f]) for f in args.factors]
            capacity = statistics.median(capacities)
            if args.soak:
                soak = _open_loop_point(target, args, sampler, args.factors[0], capacity, args.soak)
                points.append(soak)
                _log(soak)
            storm = _storm_point(target, args, sampler, capacity) if args.storm else None
            sampler.mark("idle")
            time.sleep(args.idle)
            rss_after = process_group_rss(server.proc.pid)
        finally:
            sampler.stop()
    entry = {
        "key": model.key,
        "title": model.title,
        "path": str(model.path),
        "budget_ms": settings.max_queue_delay_ms,
        "full_batch_ms": batch_ms,
        "capacity_per_s": round(capacity, 1),
        "capacities_per_s": [round(c, 1) for c in capacities],
        "points": points,
        "rounds": rounds,
        "storm": storm,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_after_idle_mb": round(rss_after / 2**20, 1),
        "rss_curve": [(round(t, 2), round(b / 2**20, 1)) for t, b in sampler.samples],
        "rss_marks": [(round(t, 2), label) for t, label in sampler.marks],
    }
    entry["targets"] = check_targets(entry)
    for t in entry["targets"]:
        log.info(
            "  target %s: %s (%s)", t["target"], t["measured"], "met" if t["met"] else "MISSED"
        )
    return entry


def _log(p: dict) -> None:
    log.info(
        "  %gx: offered %.0f/s sent %.0f/s goodput %.1f/s (%.2fx) accepted p50 %.1f p99 %.1f ms"
        "  refused %d p99 %.2f ms (wire %.2f)  504 %d  late %d  rss %.0f MB",
        p["factor"],
        p["offered_per_s"],
        p["sent_per_s"],
        p["goodput_per_s"],
        p["goodput_fraction"],
        p["accepted_p50_ms"],
        p["accepted_p99_ms"],
        p["refused"],
        p["refused_p99_ms"],
        p["refused_wire_p99_ms"],
        p["http_504"],
        p["late_sends"],
        p["rss_peak_mb"],
    )


def _fraction(p: dict) -> str:
    """Goodput over capacity; over several rounds the median, then the range."""
    lo_hi = p.get("goodput_fraction_range")
    if p.get("rounds", 1) > 1 and lo_hi:
        return f"{p['goodput_fraction']:.2f}x ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})"
    return f"{p['goodput_fraction']:.2f}x"


def _refusal_p99(p: dict) -> str:
    lo_hi = p.get("refused_p99_ms_range")
    if p.get("rounds", 1) > 1 and lo_hi and not math.isnan(p["refused_p99_ms"]):
        return f"{p['refused_p99_ms']:.2f} ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})"
    return f"{p['refused_p99_ms']:.2f}"


def _log_storm(p: dict) -> None:
    log.info(
        "  storm c=%d: goodput %.1f/s (%.2fx) accepted p50 %.1f p99 %.1f ms  refused %.0f/s "
        "p99 %.2f ms  504 %d  other errors %d  rss %.0f MB  cores: server %.2f, client %.2f",
        p["clients"],
        p["goodput_per_s"],
        p["goodput_fraction"],
        p["accepted_p50_ms"],
        p["accepted_p99_ms"],
        p["refused_per_s"],
        p["refused_p99_ms"],
        p["http_504"],
        p["other_errors"],
        p["rss_peak_mb"],
        p["server_cores"],
        p["client_cores"],
    )


def markdown(results: dict) -> str:
    lines = [
        *report.header("Overload results", results["environment"]),
        "- Capacity: closed loop at the given concurrency; overload: open loop (Poisson) at each "
        "factor times that capacity, latency from the scheduled send time (refusals also "
        "from the moment the request was written, which leaves out the client's own lag). "
        "Goodput counts 200s only. The load generator shares the cores with the server.",
        "",
    ]
    for m in results["models"]:
        lines += [
            f"## {m['title']}",
            "",
            f"Capacity {m['capacity_per_s']:.1f} req/s"
            + (
                f" (median of {len(m['capacities_per_s'])} rounds: "
                + ", ".join(f"{c:.1f}" for c in m["capacities_per_s"])
                + "; each round's load is a multiple of its own capacity, and every figure "
                "below is the median over rounds)"
                if len(m.get("capacities_per_s", [])) > 1
                else ""
            )
            + f"; latency budget "
            f"{m['budget_ms']:g} ms; a full batch takes {m['full_batch_ms']:.1f} ms in raw ORT. "
            f"RSS {m['rss_start_mb']:.0f} MB before the overload, "
            f"{m['rss_after_idle_mb']:.0f} MB after it and an idle pause.",
            "",
            "| load | s | offered/s | sent/s | goodput/s | of capacity | accepted p50 ms | "
            "accepted p99 ms | 429 | refusal p99 ms | refusal p99 from the write ms | 504 | "
            "other errors | late sends | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in m["points"]:
            lines.append(
                f"| {p['factor']:g}x | {p['seconds']:g} | {p['offered_per_s']:,.0f} | "
                f"{p['sent_per_s']:,.0f} | {p['goodput_per_s']:,.1f} | "
                f"{_fraction(p)} | {p['accepted_p50_ms']:.1f} | "
                f"{p['accepted_p99_ms']:.1f} | {p['http_429']:,} | {_refusal_p99(p)} | "
                f"{p['refused_wire_p99_ms']:.2f} | {p['http_504']} | {p['other_errors']} | "
                f"{p['late_sends']:,} | {p['rss_peak_mb']:.0f} |"
            )
        storm = m.get("storm")
        if storm:
            lines += [
                "",
                f"Retry storm: {storm['clients']} closed-loop clients that resend at once, "
                f"refused or not ({storm.get('client', 'loadgen')}), for "
                f"{storm['seconds']:g} s: goodput {storm['goodput_per_s']:,.1f}/s "
                f"({storm['goodput_fraction']:.2f}x of capacity), accepted p50/p99 "
                f"{storm['accepted_p50_ms']:.1f}/{storm['accepted_p99_ms']:.1f} ms, "
                f"{storm['refused_per_s']:,.0f} refusals/s (p99 {storm['refused_p99_ms']:.1f} ms), "
                f"{storm['http_504']} x 504, other errors {storm['other_errors']}, "
                f"peak RSS {storm['rss_peak_mb']:.0f} MB; CPU: the server "
                f"{storm['server_cores']:.2f} cores, the load generator "
                f"{storm['client_cores']:.2f}.",
            ]
        lines += ["", "| target | measured | met |", "|---|---|:-:|"]
        for t in m["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def plot_rss(model: dict, path: Path) -> None:
    """The RSS curve with the load phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ts = [t for t, _ in model["rss_curve"]]
    ax.plot(ts, [mb for _, mb in model["rss_curve"]], lw=1.2)
    peak = max((mb for _, mb in model["rss_curve"]), default=1.0)
    for i, (t, label) in enumerate(model["rss_marks"]):
        ax.axvline(t, color="grey", lw=0.6, ls="--")
        # Staggered: phases that start seconds apart would print over each other.
        ax.text(t, peak * (1.18 - 0.07 * (i % 3)), f" {label}", fontsize=7, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"{model['key']} model: server resident memory under overload")
    peak = max((mb for _, mb in model["rss_curve"]), default=1.0)
    ax.set_ylim(0, peak * 1.2)  # room above the curve for the phase labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


WORKLOAD = Workload(
    name="overload",
    help="capacity, then open-loop load at multiples of it and a retry storm (goodput, "
    "refusal latency, 504s, server RSS)",
    description=__doc__,
    add_arguments=add_arguments,
    run_model=run_model,
    markdown=markdown,
    load_seconds=load_seconds,
    defaults=DEFAULTS,
    quick=QUICK,
    check_args=check_args,
    plot=plot_rss,
    plot_suffix="_rss",
)
