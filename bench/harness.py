"""What every ``python -m bench`` workload shares: its registration, the common flags, the
models, a server started on loopback, the probe-and-sweep helper, and the report files.

A workload is a module ``bench/<name>.py`` that ends with ``WORKLOAD = Workload(...)`` and is
named in ``bench.__main__.WORKLOADS``; its name is the subcommand. It adds its own flags and
measures one model (:attr:`Workload.run_model`) against servers it starts with :func:`serve`,
usually through :func:`probe_and_sweep`; :func:`run` does the rest: presets, models, the run's
environment, the time bound, and ``OUT/NAME_results.{md,json}`` plus any plots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import RESULTS, loadgen
from bench.models import (
    BenchModel,
    custom_model,
    default_model,
    imagenet_shape_model,
    int8_model,
)
from bench.server import ServerError, ServerProcess
from service.settings import Settings

log = logging.getLogger("bench")

Args = argparse.Namespace


@dataclass(frozen=True)
class Workload:
    """One ``python -m bench`` subcommand."""

    name: str
    #: One line for ``python -m bench --help``.
    help: str
    #: The module docstring: ``python -m bench NAME --help`` shows it.
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: Measures one model; returns its entry in ``results["models"]`` (may raise ServerError).
    run_model: Callable[[BenchModel, Args, dict[str, str]], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    #: Seconds of load per model at most (the run's bound, logged before it starts).
    load_seconds: Callable[[Args], float]
    #: Values for flags left unset (None): at least ``models``, ``concurrency``, ``duration``
    #: and ``warmup`` (the common ones), and any of the workload's own.
    defaults: Mapping[str, Any]
    #: ``--quick``'s values, over :attr:`defaults`; no ``--quick`` flag when None.
    quick: Mapping[str, Any] | None = None
    #: The report's file prefix unless ``--name`` says otherwise.
    report_name: str = ""
    #: Checks across flags: calls ``parser.error`` on a bad combination.
    check_args: Callable[[argparse.ArgumentParser, Args], None] | None = None
    #: What the report adds to the run's environment.
    environment: Callable[[Args], dict[str, Any]] | None = None
    #: ``plot(model_entry, path)``, written to ``OUT/NAME_<model key><plot_suffix>.png``.
    plot: Callable[[dict[str, Any], Path], Any] | None = None
    plot_suffix: str = ""


# ------------------------------------------------------------------ flags


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_common_arguments(p: argparse.ArgumentParser, workload: Workload) -> None:
    """The flags every workload takes; unset ones get the workload's defaults."""
    d = workload.defaults
    p.add_argument(
        "--models",
        help="comma-separated: 'default' (artifacts/model.onnx, else an untrained export of "
        "its configuration), 'int8' (artifacts/model.int8.onnx, else the default quantized "
        "here), '224' (untrained alpha=1 224x224 1000 classes) or ONNX paths "
        f"({d['models']})",
    )
    p.add_argument(
        "--concurrency",
        type=ints,
        help=f"closed-loop levels ({','.join(map(str, d['concurrency']))})",
    )
    p.add_argument("--duration", type=float, help=f"measured seconds per point ({d['duration']:g})")
    p.add_argument("--warmup", type=float, help=f"unmeasured seconds per point ({d['warmup']:g})")
    p.add_argument("--max-requests", type=int, default=50_000, help="cap per point")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    if workload.quick is not None:
        p.add_argument(
            "--quick",
            action="store_true",
            help="trial defaults: " + ", ".join(_flag(k, v) for k, v in workload.quick.items()),
        )
    srv = p.add_argument_group("server settings (SEPCONV_*; unset = the service default)")
    srv.add_argument("--workers", type=int)
    srv.add_argument("--threads", type=int, help="ORT intra-op threads per worker")
    srv.add_argument("--max-batch", type=int)
    srv.add_argument("--max-wait-ms", type=float)
    srv.add_argument("--max-queue", type=int)
    srv.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="any other SEPCONV_ setting"
    )
    srv.add_argument(
        "--server-tree",
        type=Path,
        help="run the server from this checkout instead (an A/B against another commit)",
    )
    out = p.add_argument_group("report")
    out.add_argument(
        "--out", type=Path, default=RESULTS, help="where the report goes (default: %(default)s)"
    )
    out.add_argument(
        "--name",
        help=f"report file prefix: OUT/NAME_results.md ({workload.report_name or workload.name})",
    )


def _flag(key: str, value: Any) -> str:
    shown = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
    return f"--{key.replace('_', '-')} {shown}"


def apply_presets(args: Args, workload: Workload) -> Args:
    """Explicit flags win over ``--quick``, which wins over the workload's defaults."""
    layers = [workload.quick] if getattr(args, "quick", False) and workload.quick else []
    for layer in [*layers, workload.defaults]:
        for key, value in layer.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if args.name is None:
        args.name = workload.report_name or workload.name
    return args


def server_env(args: Args) -> dict[str, str]:
    """The server-settings flags as the ``SEPCONV_*`` variables the server reads."""
    env = {}
    for flag, key in (
        ("workers", "WORKERS"),
        ("threads", "INTRA_OP_THREADS"),
        ("max_batch", "MAX_BATCH_SIZE"),
        ("max_wait_ms", "MAX_WAIT_MS"),
        ("max_queue", "MAX_QUEUE_SIZE"),
    ):
        value = getattr(args, flag)
        if value is not None:
            env[f"SEPCONV_{key}"] = str(value)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env needs KEY=VALUE, got {item!r}")
        key = key if key.startswith("SEPCONV_") else f"SEPCONV_{key}"
        env[key.upper()] = value
    return env


def settings_for(model: BenchModel, env: dict[str, str]) -> Settings:
    """The Settings the server process will build: our env on top of this process's env."""
    overrides = {k[len("SEPCONV_") :].lower(): v for k, v in env.items()}
    overrides["model_path"] = str(model.path)
    return Settings(**overrides)


def resolve_models(spec: str) -> list[BenchModel]:
    models = []
    for item in (s.strip() for s in spec.split(",")):
        if item == "default":
            models.append(default_model())
        elif item == "int8":
            models.append(int8_model())
        elif item == "224":
            models.append(imagenet_shape_model())
        elif item:
            path = Path(item)
            if not path.is_file():
                raise SystemExit(f"--models: {item} is neither 'default', '224' nor a file")
            models.append(custom_model(path))
    return models


# ------------------------------------------------------------------ load against a server


@contextlib.contextmanager
def serve(
    model: BenchModel, env: dict[str, str], args: Args, *, tree: Path | None = None
) -> Iterator[ServerProcess]:
    """``python -m service`` for ``model`` on a free loopback port, from ``tree`` (default
    ``--server-tree``, else this checkout), its output in a log file named in any error."""
    tree = tree if tree is not None else args.server_tree
    log_path = Path(tempfile.gettempdir()) / (
        f"sepconv-bench-{args.workload}-{model.key}-{os.getpid()}.log"
    )
    with ServerProcess(model.path.resolve(), env, log_path, cwd=tree) as server:
        yield server


def probe(server: ServerProcess, target: loadgen.Target, timeout_s: float = 30.0) -> None:
    """One request, which must succeed: a wrong body or a broken server stops the run with the
    server's log instead of a sweep of errors."""
    result = loadgen.run(
        loadgen.closed_loop(
            target, concurrency=1, duration_s=timeout_s, max_requests=1, timeout_s=timeout_s
        )
    )
    if result.error_count:
        raise ServerError(
            f"a single request to {target.path} failed ({dict(result.errors)}); "
            f"server log {server.log_path}:\n{server.log_tail()}"
        )


def closed_point(target: loadgen.Target, concurrency: int, args: Args) -> loadgen.RunResult:
    """One closed-loop point, bounded by ``--duration`` (after ``--warmup``) and
    ``--max-requests``."""
    return loadgen.run(
        loadgen.closed_loop(
            target,
            concurrency=concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            max_requests=args.max_requests,
            timeout_s=args.timeout,
        )
    )


def probe_and_sweep(
    server: ServerProcess,
    target: loadgen.Target,
    args: Args,
    *,
    label: str = "",
    probe_first: bool = True,
) -> list[loadgen.RunResult]:
    """The probe (:func:`probe`), then a closed-loop point per ``--concurrency`` level, each
    logged; the best one's throughput is the capacity (:func:`capacity`)."""
    if probe_first:
        probe(server, target, args.timeout)
    results = []
    for c in args.concurrency:
        results.append(closed_point(target, c, args))
        log_point(results[-1].summary(), label)
    return results


def capacity(results: list[loadgen.RunResult]) -> float:
    """The best closed-loop throughput of a sweep, requests per second."""
    return max((r.throughput for r in results), default=0.0)


def log_point(p: dict[str, Any], label: str = "") -> None:
    load = f"c={p['concurrency']}" if p["mode"] == "closed" else f"rate={p['target_rate']:.0f}/s"
    log.info(
        "  %s%-12s %8.1f req/s  p50 %7.2f  p90 %7.2f  p99 %7.2f ms  errors %d  client %.0f us/req",
        f"{label} " if label else "",
        load,
        p["req_per_s"],
        p["p50_ms"],
        p["p90_ms"],
        p["p99_ms"],
        p["errors"],
        p["client_cpu_us_per_req"],
    )


def log_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        log.info(
            "  target %s: %s (%s)", t["target"], t["measured"], "met" if t["met"] else "MISSED"
        )


# ------------------------------------------------------------------ the run


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(
    args: Args, env: dict[str, str], models: list[BenchModel], argv: list[str]
) -> dict[str, Any]:
    """What every report opens with: the command, the machine, the server's settings."""
    base = settings_for(models[0], env) if models else Settings()
    return {
        "command": "python -m bench " + shlex.join(argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "server_settings": (
            f"workers {base.resolved_workers}, intra-op threads "
            f"{base.resolved_intra_op_threads}, max batch "
            f"{base.max_batch_size}, max wait {base.max_wait_ms:g} ms, "
            f"queue {base.max_queue_size}, queue delay budget "
            f"{base.max_queue_delay_ms:g} ms"
            + (f", {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}" if env else "")
        ),
        "endpoint": getattr(args, "endpoint", "classify"),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }


def write_report(workload: Workload, results: dict[str, Any], args: Args) -> Path:
    """``OUT/NAME_results.md`` and ``.json``, and a plot per model where the workload has one."""
    args.out.mkdir(parents=True, exist_ok=True)
    md_path = args.out / f"{args.name}_results.md"
    md_path.write_text(workload.markdown(results))
    (args.out / f"{args.name}_results.json").write_text(json.dumps(results, indent=2) + "\n")
    if workload.plot is not None:
        for model in results["models"]:
            workload.plot(model, args.out / f"{args.name}_{model['key']}{workload.plot_suffix}.png")
    return md_path


def run(workload: Workload, args: Args, argv: list[str]) -> int:
    """Every model through the workload, then the report; 1 when a server fails."""
    env = server_env(args)
    models = resolve_models(args.models)
    log.info(
        "%s: %d model(s), at most ~%.0f s of load plus server start-ups",
        workload.name,
        len(models),
        len(models) * workload.load_seconds(args),
    )
    results: dict[str, Any] = {
        "environment": environment(args, env, models, argv),
        "models": [],
    }
    if workload.environment is not None:
        results["environment"] |= workload.environment(args)
    started = time.perf_counter()
    try:
        for model in models:
            results["models"].append(workload.run_model(model, args, env))
    except ServerError as exc:
        log.error("server failed: %s", exc)
        return 1
    md_path = write_report(workload, results, args)
    log.info("wrote %s in %.0f s", md_path, time.perf_counter() - started)
    return 0
