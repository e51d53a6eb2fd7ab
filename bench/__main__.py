"""``python -m bench``: raw ORT, then a concurrency sweep against a real server, then the report.

For each model: measure raw ONNX Runtime in-process at batch 1 and the server's max batch,
start ``python -m service`` on loopback with the given settings, run a closed-loop point per
concurrency level and open-loop points at fractions of the best closed-loop rate, stop the
server, and check the targets. Writes ``docs/bench_results.md``, ``docs/bench_results.json``
and ``docs/bench_<model>.png``.

Every point is bounded by ``--duration`` and ``--max-requests``; the whole run by their sum.

``--overload`` and ``--photos`` run other workloads instead (:mod:`bench.overload`,
:mod:`bench.photos`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import loadgen, overload, photos, raw_ort, report
from bench.models import (
    BenchModel,
    custom_model,
    default_model,
    image_format,
    imagenet_shape_model,
    int8_model,
)
from bench.models import sample_images as make_images
from bench.server import ServerError, ServerProcess
from service.engine.decode import preprocess_images
from service.settings import Settings

log = logging.getLogger("bench")

DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64"
FULL: dict[str, Any] = {
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
PHOTOS: dict[str, Any] = {"concurrency": [8], "duration": 10.0, "warmup": 2.0}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be positive integers")
    return values


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [photos.parse_size(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one WIDTHxHEIGHT")
    return sizes


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        help="comma-separated: 'default' (artifacts/model.onnx, else an untrained export of "
        "its configuration), 'int8' (artifacts/model.int8.onnx, else the default quantized "
        "here), '224' (untrained alpha=1 224x224 1000 classes) or ONNX paths "
        "(default,int8,224; with --photos 224,default)",
    )
    p.add_argument("--concurrency", type=_ints, help=f"closed-loop levels ({DEFAULT_CONCURRENCY})")
    p.add_argument("--duration", type=float, help="measured seconds per point (5)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per point (1)")
    p.add_argument("--max-requests", type=int, default=50_000, help="cap per point")
    p.add_argument(
        "--open-fractions",
        type=_floats,
        help="open-loop rates as fractions of the best closed-loop req/s (0.5,0.8; '' for none)",
    )
    p.add_argument("--fixed-interval", action="store_true", help="open loop without Poisson")
    p.add_argument("--raw-duration", type=float, help="seconds per raw ORT batch (3)")
    p.add_argument(
        "--raw-batches",
        type=_ints,
        default=[8],
        help="raw ORT batch sizes besides 1 and the server's max batch",
    )
    p.add_argument(
        "--endpoint",
        choices=["classify", "oip", "oip-tensor"],
        default="classify",
        help="classify: POST /v1/classify, encoded image body; oip: the same image as an OIP "
        "BYTES input; oip-tensor: the preprocessed FP32 tensor, binary (what raw ORT is fed: "
        "the server's own overhead, without decoding)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    srv = p.add_argument_group("server settings (SEPCONV_*; unset = the service default)")
    srv.add_argument("--workers", type=int)
    srv.add_argument("--threads", type=int, help="ORT intra-op threads per worker")
    srv.add_argument("--max-batch", type=int)
    srv.add_argument("--max-wait-ms", type=float)
    srv.add_argument("--max-queue", type=int)
    srv.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="any other SEPCONV_ setting"
    )
    p.add_argument(
        "--server-tree",
        type=Path,
        help="run the server from this checkout instead (an A/B against another commit)",
    )
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the report goes")
    p.add_argument("--name", default="bench", help="report file prefix: OUT/NAME_results.md")
    p.add_argument(
        "--quick",
        action="store_true",
        help="trial defaults: c=1,8,32, 2 s points, one open-loop rate",
    )
    ov = p.add_argument_group("overload (--overload; see bench/overload.py)")
    ov.add_argument(
        "--overload",
        action="store_true",
        help="instead of the sweep: capacity, then open-loop load at multiples of it "
        "(goodput, accepted and refusal latency, 504s, server RSS)",
    )
    ov.add_argument(
        "--overload-factors",
        type=_floats,
        default=list(overload.DEFAULT_FACTORS),
        help="multiples of the measured capacity to offer (2,4,8)",
    )
    ov.add_argument("--overload-duration", type=float, default=10.0, help="seconds per factor")
    ov.add_argument(
        "--overload-concurrency", type=int, default=32, help="closed-loop c for capacity (32)"
    )
    ov.add_argument(
        "--overload-connections", type=int, default=1024, help="open-loop connection cap"
    )
    ov.add_argument(
        "--overload-rounds",
        type=int,
        default=1,
        help="capacity and every factor this many times; the median is reported (1)",
    )
    ov.add_argument(
        "--overload-storm",
        type=int,
        default=overload.DEFAULT_STORM,
        help="closed-loop clients that resend at once, refused or not (256; 0: none)",
    )
    ov.add_argument("--overload-pause", type=float, default=2.0, help="idle seconds between")
    ov.add_argument("--overload-idle", type=float, default=5.0, help="idle seconds at the end")
    ov.add_argument(
        "--soak", type=float, default=0.0, help="then SECONDS more at the first factor (RSS curve)"
    )
    photo = p.add_argument_group("photos (--photos; see bench/photos.py)")
    photo.add_argument(
        "--photos",
        action="store_true",
        help="instead of the sweep: generated camera-sized JPEGs through /v1/classify "
        "(c=8, 10 s points unless set)",
    )
    photo.add_argument(
        "--photo-sizes",
        type=_sizes,
        default=list(photos.PHOTO_SIZES),
        help="comma-separated WIDTHxHEIGHT (1280x960,4000x3000)",
    )
    photo.add_argument(
        "--compare-tree",
        type=Path,
        help="also serve from this checkout, in rounds alternating with --server-tree (or "
        "this tree), and report the throughput ratio",
    )
    photo.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds with --compare-tree (2)"
    )
    args = p.parse_args(argv)
    if args.compare_tree is not None and not (args.compare_tree / "service").is_dir():
        p.error(f"--compare-tree {args.compare_tree}: no service/ package there")
    if args.overload_rounds < 1:
        p.error("--overload-rounds must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.models = args.models or ("224,default" if args.photos else "default,int8,224")
    if args.photos:
        for key, value in PHOTOS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    # Explicit flags win over both presets.
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def server_env(args: argparse.Namespace) -> dict[str, str]:
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


def target_for(model: BenchModel, server: ServerProcess, endpoint: str) -> loadgen.Target:
    images = make_images(model.spec, count=64)
    if endpoint == "classify":
        _, media_type = image_format(model.spec)
        return loadgen.Target(
            server.host, server.port, "/v1/classify", tuple(images), content_type=media_type
        )
    # OIP binary tensor extension: a JSON header, then the raw input bytes.
    bodies = []
    if endpoint == "oip-tensor":
        tensors = preprocess_images(images, model.spec, max_pixels=Settings().max_pixels)
        inputs = [
            (model.spec.input_name, "FP32", list(t[None].shape), t.tobytes()) for t in tensors
        ]
    else:  # a BYTES element is a 4-byte length, then the encoded file
        inputs = [("image", "BYTES", [1], struct.pack("<I", len(b)) + b) for b in images]
    for name, datatype, shape, data in inputs:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "shape": shape,
                        "datatype": datatype,
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
            },
            separators=(",", ":"),
        ).encode()
        bodies.append((header, header + data))
    header_len = {len(h) for h, _ in bodies}
    if len(header_len) != 1:  # one pre-built header value per request is all Target supports
        raise RuntimeError("OIP headers differ in length across images")
    return loadgen.Target(
        server.host,
        server.port,
        f"/v2/models/{model.spec.name}/infer",
        tuple(b for _, b in bodies),
        content_type="application/octet-stream",
        extra_headers=(("Inference-Header-Content-Length", str(header_len.pop())),),
    )


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


def bench_model(model: BenchModel, args: argparse.Namespace, env: dict[str, str]) -> dict:
    settings = settings_for(model, env)
    batches = sorted(
        {b for b in args.raw_batches if b <= settings.max_batch_size} | {1, settings.max_batch_size}
    )
    log.info("%s: raw ORT at batch %s", model.title, batches)
    raw = [raw_ort.measure(settings, b, duration_s=args.raw_duration).summary() for b in batches]
    for r in raw:
        log.info("  raw batch %(batch)d: %(images_per_s).1f img/s", r)

    points: list[dict[str, Any]] = []
    log_path = Path(tempfile.gettempdir()) / f"sepconv-bench-{model.key}-{os.getpid()}.log"
    with ServerProcess(model.path, env, log_path, cwd=args.server_tree) as server:
        target = target_for(model, server, args.endpoint)
        probe = loadgen.run(
            loadgen.closed_loop(target, concurrency=1, duration_s=5, max_requests=1)
        )
        if probe.error_count:
            raise ServerError(
                f"a single request to {target.path} failed ({dict(probe.errors)}); "
                f"server log {log_path}:\n{server.log_tail()}"
            )
        for c in args.concurrency:
            result = loadgen.run(
                loadgen.closed_loop(
                    target,
                    concurrency=c,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    max_requests=args.max_requests,
                    timeout_s=args.timeout,
                )
            )
            points.append(result.summary())
            _log_point(points[-1])
        peak = max((p["req_per_s"] for p in points), default=0.0)
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
            _log_point(points[-1])
    entry = {
        "key": model.key,
        "title": model.title,
        "path": str(model.path),
        "trained": model.trained,
        "raw": raw,
        "points": points,
    }
    entry["targets"] = check_targets(model, raw, points)
    for t in entry["targets"]:
        log.info(
            "  target %s: %s (%s)", t["target"], t["measured"], "met" if t["met"] else "MISSED"
        )
    return entry


def _log_point(p: dict[str, Any]) -> None:
    load = f"c={p['concurrency']}" if p["mode"] == "closed" else f"rate={p['target_rate']:.0f}/s"
    log.info(
        "  %-12s %8.1f req/s  p50 %7.2f  p90 %7.2f  p99 %7.2f ms  errors %d  client %.0f us/req",
        load,
        p["req_per_s"],
        p["p50_ms"],
        p["p90_ms"],
        p["p99_ms"],
        p["errors"],
        p["client_cpu_us_per_req"],
    )


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    env = server_env(args)
    models = resolve_models(args.models)
    points_per_model = len(args.concurrency) + len(args.open_fractions)
    bound = len(models) * (
        points_per_model * (args.duration + args.warmup)
        + (len(args.raw_batches) + 2) * args.raw_duration
    )
    if args.overload:
        bound = len(models) * (
            (args.duration + args.warmup) * args.overload_rounds
            + args.raw_duration
            + (len(args.overload_factors) * args.overload_rounds + bool(args.overload_storm))
            * (args.overload_duration + args.overload_pause)
            + args.soak
            + args.overload_idle
        )
    if args.photos:
        servers = (2 * args.rounds) if args.compare_tree else 1
        points = servers * len(args.photo_sizes) * len(args.concurrency)
        bound = len(models) * points * (args.duration + args.warmup)
    log.info("%d model(s), at most ~%.0f s of load plus server start-ups", len(models), bound)
    base_settings = settings_for(models[0], env) if models else Settings()
    results: dict[str, Any] = {
        "environment": {
            "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "server_settings": (
                f"workers {base_settings.resolved_workers}, intra-op threads "
                f"{base_settings.resolved_intra_op_threads}, max batch "
                f"{base_settings.max_batch_size}, max wait {base_settings.max_wait_ms:g} ms, "
                f"queue {base_settings.max_queue_size}, queue delay budget "
                f"{base_settings.max_queue_delay_ms:g} ms"
                + (f", {' '.join(f'{k}={v}' for k, v in sorted(env.items()))}" if env else "")
            ),
            "endpoint": args.endpoint,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        },
        "models": [],
    }
    if args.photos:
        results["environment"] |= photos.environment(args)
    started = time.perf_counter()
    try:
        for model in models:
            if args.photos:
                entry = photos.bench_photos(model, args, env)
            elif args.overload:
                entry = overload.run_model(model, args, env, settings_for(model, env), target_for)
            else:
                entry = bench_model(model, args, env)
            results["models"].append(entry)
    except ServerError as exc:
        log.error("server failed: %s", exc)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.photos:
        name = "photos" if args.name == "bench" else args.name
        md_path = args.out / f"{name}_results.md"
        md_path.write_text(photos.markdown(results))
        (args.out / f"{name}_results.json").write_text(json.dumps(results, indent=2) + "\n")
        log.info("wrote %s in %.0f s", md_path, time.perf_counter() - started)
        return 0
    if args.overload:
        name = "overload" if args.name == "bench" else args.name
        md_path = args.out / f"{name}_results.md"
        md_path.write_text(overload.markdown(results))
        (args.out / f"{name}_results.json").write_text(json.dumps(results, indent=2) + "\n")
        for model in results["models"]:
            overload.plot_rss(model, args.out / f"{name}_{model['key']}_rss.png")
        log.info("wrote %s and RSS plots in %.0f s", md_path, time.perf_counter() - started)
        return 0
    md_path = args.out / f"{args.name}_results.md"
    md_path.write_text(report.markdown(results))
    (args.out / f"{args.name}_results.json").write_text(json.dumps(results, indent=2) + "\n")
    for model in results["models"]:
        report.plot(model, args.out / f"{args.name}_{model['key']}.png")
    log.info("wrote %s and plots in %.0f s", md_path, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
