"""``python -m bench.peers``: sepconv-serve with no settings against its peers, in one run.

For each model, each round, each server in turn (the order rotates between rounds, so drifting
background load does not always hit the same server): start it on loopback, check one answer
against the model, measure closed-loop points (c=1 and c=32 by default) with
:mod:`bench.loadgen`, stop it. Raw ONNX Runtime is measured in-process as the ceiling. Writes
``docs/results/peers_results.md`` and ``docs/results/peers_results.json``.

KServe runs from its own venv, created on first use under ``~/.cache/sepconv-serve/peers``
(needs the package index; ``--no-install`` refuses instead, ``--servers`` without ``kserve``
skips it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import RESULTS, harness, loadgen, raw_ort
from bench.harness import cpu_name, ints, resolve_models
from bench.models import BenchModel, sample_images
from bench.peers import contenders, results, venvs
from bench.peers.common import MAX_PIXELS, load_model, softmax
from bench.server import ServerError
from sepconv.preprocess import preprocess_bytes

log = logging.getLogger("bench.peers")

ALL = (*contenders.SERVERS, "raw")
#: The defaults worth naming in the report; the JSON keeps every setting.
SHOWN_SETTINGS = (
    "workers",
    "lanes",
    "intra_op_threads",
    "ort_spinning",
    "max_batch_size",
    "max_wait_ms",
    "max_queue_size",
    "max_queue_delay_ms",
    "inline_inference_max_ms",
)


def _servers(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(ALL)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="default,224",
        help="comma-separated, as for `python -m bench`: 'default', '224', 'int8' or ONNX paths",
    )
    p.add_argument(
        "--servers",
        type=_servers,
        default=list(ALL),
        help=f"comma-separated subset of {','.join(ALL)} (all)",
    )
    p.add_argument("--concurrency", type=ints, default=[1, 32], help="closed-loop levels (1,32)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point (5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per point (1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every server; median shown (1)")
    p.add_argument("--max-requests", type=int, default=50_000, help="cap per point")
    p.add_argument("--raw-duration", type=float, default=3.0, help="seconds per raw ORT batch")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--venv-root", type=Path, help=f"peer venvs ({venvs.cache_root()})")
    p.add_argument(
        "--no-install", action="store_true", help="fail instead of creating a missing peer venv"
    )
    p.add_argument("--note", default="", help="a sentence on the run conditions, for the report")
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="where the report goes (default: %(default)s)"
    )
    p.add_argument("--name", default="peers", help="report file prefix: OUT/NAME_results.md")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def reference_probs(model: BenchModel, image: bytes) -> np.ndarray:
    """What the model says about ``image``, computed here: every server's answer must agree."""
    session, spec = load_model(str(model.path))
    x = preprocess_bytes(image, spec, max_pixels=MAX_PIXELS)
    return softmax(session.run([spec.output_name], {spec.input_name: x[None]})[0])[0]


def measure_server(
    server: str, model: BenchModel, args: argparse.Namespace, reference: np.ndarray, **kw
) -> list[dict[str, Any]]:
    log_path = Path(tempfile.gettempdir()) / f"sepconv-peers-{server}-{model.key}.log"
    runs = []
    with contenders.start(server, model, log_path, **kw) as srv:
        log.info("  %s up in %.1f s (log %s)", server, srv.startup_s, log_path)
        for protocol in contenders.PROTOCOLS[server]:
            requests = contenders.requests_for(protocol, model)
            try:
                answer = contenders.post(srv.base_url, requests, requests.bodies[0])
                contenders.check_answer(protocol, answer, reference)
            except (OSError, ValueError) as exc:
                raise ServerError(
                    f"{server} {protocol}: the first answer is wrong or missing ({exc}); "
                    f"server log {log_path}:\n{srv.log_tail()}"
                ) from exc
            target = loadgen.Target(
                srv.host,
                srv.port,
                requests.path,
                requests.bodies,
                requests.content_type,
                requests.headers,
            )
            points = []
            for c in args.concurrency:
                points.append(harness.closed_point(target, c, args).summary())
                p = points[-1]
                log.info(
                    "  %-8s %-8s c=%-3d %8.1f req/s  p50 %7.2f  p99 %7.2f ms  errors %d",
                    server,
                    protocol,
                    c,
                    p["req_per_s"],
                    p["p50_ms"],
                    p["p99_ms"],
                    p["errors"],
                )
            runs.append(
                {
                    "server": server,
                    "protocol": protocol,
                    "startup_s": round(srv.startup_s, 2),
                    "workers": srv.workers,
                    "points": points,
                }
            )
    return runs


def measure_raw(model: BenchModel, args: argparse.Namespace) -> list[dict[str, Any]]:
    from service.settings import Settings

    settings = Settings(model_path=model.path)
    batches = sorted({1, 8, settings.max_batch_size})
    out = [
        {
            **raw_ort.measure(settings, b, duration_s=args.raw_duration).summary(),
            "role": "throughput",
        }
        for b in batches
    ]
    # One image on one session with every core: the latency a lone request could have.
    lone = raw_ort.measure(
        Settings(model_path=model.path, workers=1), 1, duration_s=args.raw_duration
    )
    out.append({**lone.summary(), "role": "lone"})
    for r in out:
        log.info(
            "  raw ORT batch %(batch)d, %(sessions)d x %(intra_op_threads)d threads: "
            "%(images_per_s).1f img/s, p50 %(batch_latency_ms_p50).2f ms",
            r,
        )
    return out


def measure_model(
    model: BenchModel, args: argparse.Namespace, kserve_python: Path | None
) -> dict[str, Any]:
    log.info("%s", model.title)
    reference = reference_probs(model, sample_images(model.spec, count=1)[0])
    runs: list[dict[str, Any]] = []
    raw_rounds: list[list[dict[str, Any]]] = []
    for index in range(args.rounds):
        shift = index % len(args.servers)
        order = args.servers[shift:] + args.servers[:shift]
        for server in order:
            if server == "raw":
                raw_rounds.append(measure_raw(model, args))
                continue
            for run in measure_server(server, model, args, reference, kserve_python=kserve_python):
                runs.append({**run, "round": index})
    return {
        "key": model.key,
        "title": model.title,
        "path": str(model.path),
        "trained": model.trained,
        "raw": median_raw(raw_rounds),
        "raw_rounds": raw_rounds,
        "runs": runs,
    }


def median_raw(raw_rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per batch size and role (throughput, or the lone request's latency), the round with the
    median images/s."""
    by_batch: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in raw_rounds:
        for r in rnd:
            by_batch.setdefault((r.get("role", "throughput"), r["batch"]), []).append(r)
    out = []
    for _, rows in sorted(by_batch.items()):
        rows = sorted(rows, key=lambda r: r["images_per_s"])
        out.append(rows[len(rows) // 2])
    return out


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=contenders.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=contenders.REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sepconv_defaults() -> tuple[str, dict[str, Any]]:
    """The settings sepconv-serve resolves with no flags: a short line, and all of them."""
    from service.settings import Settings

    settings = Settings()
    shown = []
    for name in SHOWN_SETTINGS:
        if not hasattr(settings, name):
            continue  # a setting renamed or gone: the JSON still has the full list
        value = getattr(settings, name)
        resolved = getattr(settings, f"resolved_{name}", value)
        shown.append(f"{name} {value}" + (f" ({resolved})" if resolved != value else ""))
    return ", ".join(shown), json.loads(settings.model_dump_json())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    for key in sorted(k for k in os.environ if k.startswith("SEPCONV_")):
        log.warning("ignoring %s: this command measures sepconv-serve's defaults", key)
        del os.environ[key]
    models = resolve_models(args.models)
    kserve_python = None
    if "kserve" in args.servers:
        try:
            kserve_python = venvs.ensure_venv(
                venvs.KSERVE, args.venv_root, install=not args.no_install
            )
        except venvs.PeerSetupError as exc:
            log.error("%s", exc)
            return 2
    shown, all_settings = sepconv_defaults()
    versions = {p: venvs.current_version(p) for p in ("onnxruntime", "fastapi", "uvicorn")}
    if kserve_python is not None:
        versions["kserve"] = venvs.installed_version(kserve_python.parent.parent, "kserve")
    report: dict[str, Any] = {
        "environment": {
            "command": "python -m bench.peers "
            + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "note": args.note,
            "commit": _commit(),
            "sepconv_defaults": shown,
            "sepconv_settings": all_settings,
            "versions": versions,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "servers": args.servers,
        },
        "models": [],
    }
    started = time.perf_counter()
    try:
        for model in models:
            report["models"].append(measure_model(model, args, kserve_python))
    except ServerError as exc:
        log.error("%s", exc)
        return 1
    report["environment"]["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    md_path = args.out / f"{args.name}_results.md"
    md_path.write_text(results.markdown(report))
    (args.out / f"{args.name}_results.json").write_text(
        json.dumps(report, indent=2, default=str) + "\n"
    )
    log.info("wrote %s in %.0f s", md_path, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
