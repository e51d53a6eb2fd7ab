"""``python -m bench.decoders``: JPEG decode + preprocess speed, Pillow against simplejpeg.

One thread, in process, no server: each image goes bytes -> :func:`sepconv.preprocess.open_image`
-> ``load`` -> ``prepare`` -> ``normalize``, exactly what serving and training do per image, for
a 28 px grey model (the default's input) and a 224 px RGB one, on two kinds of JPEG made by
:func:`bench.photos.photo_jpeg`: 224x224 thumbnails and 4000x3000 (12 MP) photos.

Variants: the decoder (``pillow`` or ``simplejpeg``) and, for the grey model, how a colour JPEG
becomes grey (``rgb``: decode colour then convert, what every model did before ``jpeg_gray``;
``y-plane``: the JPEG's own luma plane). ``pillow`` + ``rgb`` is the code before this decoder.
Speed is images per CPU second of the measuring thread (what a server core's capacity depends
on, and less disturbed by other load on a shared machine than wall time). The variants take
turns in short rounds, so the machine's drift hits all alike; each figure is the median over
rounds, and each speed-up the median of the per-round ratios to ``pillow`` + ``rgb``. Before
timing, the variants that must agree (same ``jpeg_gray``, either decoder) are checked to give
identical tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import RESULTS
from bench.harness import cpu_name
from bench.photos import photo_jpeg
from sepconv import jpeg
from sepconv.preprocess import Preprocessing, load, normalize, open_image, prepare

MAX_PIXELS = 10**9
#: (name, width, height, distinct images, images per variant per round)
WORKLOADS = (("224x224 thumbnail", 224, 224, 16, 100), ("4000x3000 photo", 4000, 3000, 2, 3))
MODELS = {
    "28 px L": Preprocessing.neutral(28, "L"),
    "224 px RGB": Preprocessing.neutral(224, "RGB"),
}
BASELINE = ("pillow", "rgb")


def variants(spec: Preprocessing) -> list[tuple[str, str]]:
    """(decoder, jpeg_gray) pairs worth timing: jpeg_gray only matters to a grey model."""
    grays = ("rgb", "y-plane") if spec.color_mode == "L" else ("rgb",)
    return [(decoder, gray) for gray in grays for decoder in ("pillow", "simplejpeg")]


def preprocess_one(data: bytes, spec: Preprocessing, decoder: str) -> np.ndarray:
    img = load(open_image(data, max_pixels=MAX_PIXELS), spec, decoder=decoder)
    return normalize(prepare(img, spec), spec)


def check_identical(blobs: list[bytes], spec: Preprocessing) -> bool:
    """Both decoders give the same tensors for every image (the bench's own sanity check)."""
    return all(
        np.array_equal(preprocess_one(b, spec, "pillow"), preprocess_one(b, spec, "simplejpeg"))
        for b in blobs
    )


def measure(rounds: int, scale: float = 1.0) -> list[dict[str, Any]]:
    rows = []
    for name, width, height, distinct, per_round in WORKLOADS:
        blobs = [photo_jpeg(width, height, seed=100 + i) for i in range(distinct)]
        count = max(1, round(per_round * scale))
        for model, base_spec in MODELS.items():
            pairs = variants(base_spec)
            specs = {p: base_spec.model_copy(update={"jpeg_gray": p[1]}) for p in pairs}
            identical = all(check_identical(blobs, s) for s in specs.values())
            rates: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
            for _ in range(rounds + 1):  # the first round warms caches and is not counted
                for pair in pairs:
                    spec, decoder = specs[pair], pair[0]
                    start = time.thread_time()
                    for i in range(count):
                        preprocess_one(blobs[i % distinct], spec, decoder)
                    rates[pair].append(count / (time.thread_time() - start))
            for pair in pairs:
                runs = rates[pair][1:]
                ratios = [a / b for a, b in zip(runs, rates[BASELINE][1:], strict=True)]
                rows.append(
                    {
                        "workload": name,
                        "mean_bytes": round(sum(map(len, blobs)) / distinct),
                        "model": model,
                        "decoder": pair[0],
                        "jpeg_gray": pair[1] if base_spec.color_mode == "L" else "-",
                        "img_per_s": statistics.median(runs),
                        "speedup": statistics.median(ratios),
                        "identical": identical,
                    }
                )
                print(
                    f"  {name:18} {model:10} {pair[0]:10} {rows[-1]['jpeg_gray']:7} "
                    f"{rows[-1]['img_per_s']:9.1f} img/s  {rows[-1]['speedup']:.2f}x",
                    file=sys.stderr,
                )
    return rows


def markdown(rows: list[dict[str, Any]], command: str, rounds: int) -> str:
    import PIL
    from PIL import features

    sj = jpeg.simplejpeg.__version__ if jpeg.available() else "not installed"
    lines = [
        "# JPEG decoders: decode + preprocess speed",
        "",
        f"Generated by `{command}` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"- Machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores available, one thread "
        f"used; load average before the run {' '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        f"- Pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')}), "
        f"simplejpeg {sj}.",
        "- Per image: open (header) -> load (decode at DCT scale, EXIF turn) -> prepare "
        "(colour, centre crop + bilinear resize) -> normalize, single thread, in process. "
        "images/s: per CPU second of that thread. "
        f"Median of {rounds} rounds; speed-up: median of the per-round ratios to Pillow + `rgb` "
        "(the code before simplejpeg). `identical`: both decoders gave the same tensors for "
        "every image of the row's workload and model.",
        "",
        "| JPEG | mean size | model | decoder | jpeg_gray | images/s | speed-up | identical |",
        "|---|---:|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        size = r["mean_bytes"]
        size_text = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
        lines.append(
            f"| {r['workload']} | {size_text} | {r['model']} | {r['decoder']} | {r['jpeg_gray']} "
            f"| {r['img_per_s']:,.1f} | {r['speedup']:.2f}x | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11, help="timed rounds (default: %(default)s)")
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the images timed per round (default: %(default)s, about 20 s in all)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "decoders_results.md",
        help="also write the Markdown table here (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    if not jpeg.available():
        print("simplejpeg is not installed: pip install simplejpeg", file=sys.stderr)
        return 1
    if args.rounds < 1 or args.scale <= 0:
        ap.error("--rounds must be at least 1 and --scale positive")
    command = "python -m bench.decoders " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(measure(args.rounds, args.scale), command.strip(), args.rounds)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
