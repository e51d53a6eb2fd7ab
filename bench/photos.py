"""``python -m bench photos``: camera-sized JPEGs through ``POST /v1/classify``.

A phone photo costs the server far more to decode than to classify (a 4000x3000 JPEG against a
224 px model), so this workload measures decoding as clients really send it: generated, seeded
JPEGs of 1280x960 and 4000x3000 (broad colour regions, finer texture and sensor-like grain, so
they compress like photos: about 0.35 and 3.5 MB at quality 90), one per request, closed loop.

``--compare-tree DIR`` runs the same load against a server started from another checkout (say
the previous release) in alternating rounds, A B A B, so both see the same machine noise, and
reports this tree's (or ``--server-tree``'s) throughput as a ratio of that one's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops

from bench import harness, loadgen, report
from bench.harness import Args, Workload
from bench.models import BenchModel

log = harness.log

PHOTO_SIZES = ((1280, 960), (4000, 3000))
#: Distinct photos per size, sent round-robin (4 x 3.5 MB requests are built up front).
PHOTOS_PER_SIZE = 4
DEFAULTS: dict[str, Any] = {
    "models": "224,default",
    "concurrency": [8],
    "duration": 10.0,
    "warmup": 2.0,
}


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour regions, texture and fine grain, fully seeded.

    A flat or smooth image compresses to almost nothing and decodes faster than any photo;
    white noise is the opposite. Real photos sit in between, and decoding time follows the
    compressed size (entropy decoding), so the mix is tuned to photo-like sizes.
    """
    rng = np.random.default_rng(seed)

    def field(cells_w: int, cells_h: int, method: Image.Resampling) -> Image.Image:
        cells = rng.integers(0, 256, (cells_h, cells_w, 3), dtype=np.uint8)
        return Image.fromarray(cells, "RGB").resize((width, height), method)

    img = Image.blend(
        field(6, 4, Image.Resampling.BICUBIC),  # sky, walls, large objects
        field(max(2, width // 48), max(2, height // 48), Image.Resampling.BILINEAR),
        0.3,
    )
    # Grain from a seeded tile (a 12-megapixel Gaussian draw takes seconds; the codec cannot
    # tell the repetition 500 px apart).
    tile = np.clip(rng.normal(128.0, 6.0, (509, 511)), 0, 255).astype(np.uint8)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]))
    grain = Image.fromarray(np.tile(tile, reps)[:height, :width], "L").convert("RGB")
    img = ImageChops.add(img, grain, 1.0, -128)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_set(width: int, height: int, count: int = PHOTOS_PER_SIZE, seed: int = 0) -> list[bytes]:
    return [photo_jpeg(width, height, seed=seed * 1000 + i) for i in range(count)]


def parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(w), int(h)


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [parse_size(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one WIDTHxHEIGHT")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=list(PHOTO_SIZES),
        help="comma-separated WIDTHxHEIGHT (1280x960,4000x3000)",
    )
    p.add_argument(
        "--compare-tree",
        type=Path,
        help="also serve from this checkout, in rounds alternating with --server-tree (or "
        "this tree), and report the throughput ratio",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds with --compare-tree (2)"
    )


def check_args(parser: argparse.ArgumentParser, args: Args) -> None:
    if args.compare_tree is not None and not (args.compare_tree / "service").is_dir():
        parser.error(f"--compare-tree {args.compare_tree}: no service/ package there")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")


def load_seconds(args: Args) -> float:
    servers = (2 * args.rounds) if args.compare_tree else 1
    return servers * len(args.sizes) * len(args.concurrency) * (args.duration + args.warmup)


def service_module(tree: Path | None) -> str:
    """Which ``service`` package a server started in ``tree`` imports (for the report)."""
    code = "import service; print(service.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or f"(cannot import service: {out.stderr.strip()[-200:]})"


def environment(args: Args) -> dict[str, Any]:
    """What the report says about the two servers besides the sweep's environment."""
    return {
        "rounds": args.rounds,
        "server_tree": str(args.server_tree) if args.server_tree else None,
        "compare_tree": str(args.compare_tree) if args.compare_tree else None,
        "service_module": service_module(args.server_tree),
        "compare_service_module": (
            service_module(args.compare_tree) if args.compare_tree else None
        ),
    }


def _label(tree: Path | None) -> str:
    return str(tree) if tree else "this tree"


def _measure_server(
    model: BenchModel,
    env: dict[str, str],
    tree: Path | None,
    photos: dict[tuple[int, int], list[bytes]],
    args: Args,
) -> list[dict[str, Any]]:
    label = _label(tree)
    points = []
    with harness.serve(model, env, args, tree=tree) as server:
        for (w, h), bodies in photos.items():
            target = loadgen.Target(
                server.host, server.port, "/v1/classify", tuple(bodies), content_type="image/jpeg"
            )
            sweep = harness.probe_and_sweep(
                server, target, args, label=f"{model.key} {w}x{h} ({label})"
            )
            size = {"size": f"{w}x{h}", "mean_bytes": round(sum(map(len, bodies)) / len(bodies))}
            points += [{"tree": label, **size, **result.summary()} for result in sweep]
    return points


def summarize(points: list[dict[str, Any]], compare: str | None) -> list[dict[str, Any]]:
    """Per (size, concurrency, tree): the median over rounds; and this tree vs the other, as
    the ratio within each round (the two servers ran back to back, on the same machine noise)
    and its median over rounds."""
    rows = []
    keys = sorted({(p["size"], p["concurrency"]) for p in points}, key=lambda k: (k[1], k[0]))
    for size, c in keys:
        by_tree: dict[str, list[dict[str, Any]]] = {}
        for p in points:
            if (p["size"], p["concurrency"]) == (size, c):
                by_tree.setdefault(p["tree"], []).append(p)
        row: dict[str, Any] = {"size": size, "concurrency": c}
        for tree, runs in by_tree.items():
            key = "compare" if compare and tree == compare else "this"
            row[key] = {
                "img_per_s": [r["req_per_s"] for r in runs],
                "p99_ms": [r["p99_ms"] for r in runs],
                "median_img_per_s": statistics.median(r["req_per_s"] for r in runs),
                "median_p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "mean_bytes": runs[0]["mean_bytes"],
            }
        if "this" in row and "compare" in row:
            pairs = zip(row["this"]["img_per_s"], row["compare"]["img_per_s"], strict=False)
            ratios = [round(a / b, 2) for a, b in pairs if b > 0]
            if ratios:
                row["round_ratios"] = ratios
                row["ratio"] = round(statistics.median(ratios), 2)
        rows.append(row)
    return rows


def run_model(model: BenchModel, args: Args, env: dict[str, str]) -> dict[str, Any]:
    """Every photo size through one server per round; with a compare tree, A B A B rounds."""
    photos = {size: photo_set(*size) for size in args.sizes}
    compare = args.compare_tree
    trees: list[Path | None] = [compare, args.server_tree] if compare else [args.server_tree]
    rounds = args.rounds if compare else 1
    points = []
    for r in range(rounds):
        for tree in trees:
            log.info("%s: round %d/%d, server from %s", model.title, r + 1, rounds, tree or ".")
            for p in _measure_server(model, env, tree, photos, args):
                points.append({"round": r + 1, **p})
    return {
        "key": model.key,
        "title": model.title,
        "path": str(model.path),
        "points": points,
        "summary": summarize(points, str(compare) if compare else None),
    }


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    compare = env.get("compare_tree")
    lines = [
        *report.header("Photo workload results", env),
        f"- The measured server imports `{env['service_module']}`"
        + (f"; the compare tree's `{env['compare_service_module']}`." if compare else "."),
        f"- One generated JPEG per request to `/v1/classify` ({PHOTOS_PER_SIZE} distinct photos "
        f"per size, quality 90), closed loop, {env['duration_s']} s measured after "
        f"{env['warmup_s']} s warm-up per point"
        + (f", {env['rounds']} alternating rounds (compare tree first)." if compare else "."),
        "- images/s and p99 per round; the ratio is this tree's images/s over the compare "
        "tree's within each round (back to back), then its median over the rounds.",
        "",
    ]
    for model in results["models"]:
        lines += [f"## {model['title']}", ""]
        if compare:
            lines += [
                "| photo | mean size | c | images/s, compare tree | images/s, measured tree "
                "| ratio per round | median ratio | p99 ms, compare | p99 ms, measured | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                "| photo | mean size | c | images/s | p99 ms | errors |",
                "|---|---:|---:|---:|---:|---:|",
            ]
        for row in model["summary"]:
            this = row.get("this", {})
            size = _fmt_bytes((this or row.get("compare", {})).get("mean_bytes", 0))
            if compare:
                other = row.get("compare", {})
                lines.append(
                    f"| {row['size']} | {size} | {row['concurrency']} | "
                    f"{report.runs(other.get('img_per_s', []), 1)} | "
                    f"{report.runs(this.get('img_per_s', []), 1)} | "
                    f"{report.runs(row.get('round_ratios', []), 2)} | "
                    f"**{row.get('ratio', float('nan')):.2f}x** | "
                    f"{report.runs(other.get('p99_ms', []), 0)} | "
                    f"{report.runs(this.get('p99_ms', []), 0)} | "
                    f"{other.get('errors', 0) + this.get('errors', 0)} |"
                )
            else:
                lines.append(
                    f"| {row['size']} | {size} | {row['concurrency']} | "
                    f"{report.runs(this['img_per_s'], 1)} | {report.runs(this['p99_ms'], 0)} | "
                    f"{this['errors']} |"
                )
        lines.append("")
    return "\n".join(lines)


WORKLOAD = Workload(
    name="photos",
    help="generated camera-sized JPEGs through /v1/classify, optionally against another tree",
    description=__doc__,
    add_arguments=add_arguments,
    run_model=run_model,
    markdown=markdown,
    load_seconds=load_seconds,
    defaults=DEFAULTS,
    check_args=check_args,
    environment=environment,
)
