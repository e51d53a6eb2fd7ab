"""``python -m model sweep``: what width, standard convs, pruning, distillation and INT8 buy.

Every variant is an ordinary build (:func:`model.build.build`) on the same data with the same seed,
written to its own folder under ``--out``. A variant that needs another one (a pruned network
needs the checkpoint it prunes, a distilled one its teacher) comes after it in the plan. Each
finished variant leaves ``result.json`` with the settings it was built with and what was measured;
a second run skips every variant whose ``result.json`` holds the same settings, so an interrupted
sweep resumes where it stopped and a finished one rebuilds nothing.

Per model file the sweep records the ONNX Runtime test accuracy (measured by the build's
verification, read from the model's metadata), the exact mult-adds and parameters (the cost
report), and latency at batch 1 and throughput at batch 32 through ONNX Runtime on this machine.
:mod:`model.sweep_report` turns the rows into ``docs/results/optimization.md`` and its plot.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("model.sweep")

RESULT_FILE = "result.json"
#: Bump when the measurements change meaning, so old results are measured again.
RESULT_SCHEMA = 1


@dataclass(frozen=True)
class Variant:
    name: str
    #: What the variant is, for the table: "separable, alpha 0.5, pruned 50%".
    description: str
    #: Build settings over the sweep's base settings (BuildConfig field names).
    settings: dict[str, Any] = field(default_factory=dict)
    #: Prune the best checkpoint of this earlier variant instead of training from scratch.
    prune_from: str | None = None
    #: Distil from the ONNX export of this earlier variant.
    teacher: str | None = None
    #: Also measure the INT8 export (the build's ``--int8``) as its own row.
    int8: bool = False


@dataclass(frozen=True)
class SweepRecipe:
    build_recipe: str
    #: Settings every variant shares (over the build recipe).
    settings: dict[str, Any]
    variants: tuple[Variant, ...]
    #: Seconds of timed ORT runs per latency figure (per model and batch size).
    bench_seconds: float = 3.0


def _core(teacher: str, prune_epochs: int, extra_std: tuple[Variant, ...] = ()) -> tuple:
    return (
        Variant("sep-0.25", "separable, alpha 0.25 (the quick model)", {"alpha": 0.25}, int8=True),
        Variant("sep-0.5", "separable, alpha 0.5", {"alpha": 0.5}),
        Variant("sep-1.0", "separable, alpha 1.0", {"alpha": 1.0}, int8=True),
        Variant("std-0.25", "standard 3x3 convs, alpha 0.25", {"alpha": 0.25, "conv": "standard"}),
        *extra_std,
        # alpha 0.5 pruned by half has alpha 0.25's widths: trained wide, then cut to the
        # quick model's size, against training that size from the start.
        Variant(
            "sep-0.5-pruned-50",
            "alpha 0.5, 50% of channels pruned, fine-tuned",
            {"alpha": 0.5, "prune": 0.5, "prune_epochs": prune_epochs},
            prune_from="sep-0.5",
        ),
        Variant(
            "sep-0.25-pruned-25",
            "alpha 0.25, 25% of channels pruned, fine-tuned",
            {"alpha": 0.25, "prune": 0.25, "prune_epochs": prune_epochs},
            prune_from="sep-0.25",
        ),
        Variant(
            "sep-0.25-kd",
            f"alpha 0.25 distilled from {teacher}",
            {"alpha": 0.25},
            teacher=teacher,
        ),
    )


SWEEPS: dict[str, SweepRecipe] = {
    # About 30 minutes on 2 CPU cores: the quick build recipe at 4 epochs (alpha 1.0 takes
    # 2.5 minutes an epoch on two cores, so 8 would not fit), the standard convs at alpha 0.25
    # only (at 1.0 they cost 30x alpha 0.25's time per epoch).
    "quick": SweepRecipe("quick", {"epochs": 4}, _core("sep-1.0", prune_epochs=2)),
    # For a GPU: the full recipe for every variant, and the paper's Table 4 pair at alpha 1.0.
    "full": SweepRecipe(
        "full",
        {},
        _core(
            "sep-1.0",
            prune_epochs=15,
            extra_std=(
                Variant(
                    "std-1.0", "standard 3x3 convs, alpha 1.0", {"alpha": 1.0, "conv": "standard"}
                ),
            ),
        ),
    ),
    # About a minute: a check that every kind of variant builds, measures and reports.
    "smoke": SweepRecipe(
        "smoke",
        {"epochs": 1},
        (
            Variant("sep-0.25", "separable, alpha 0.25", {"alpha": 0.25}, int8=True),
            Variant(
                "std-0.25", "standard 3x3 convs, alpha 0.25", {"alpha": 0.25, "conv": "standard"}
            ),
            Variant(
                "sep-0.25-pruned-50",
                "alpha 0.25, 50% pruned",
                {"alpha": 0.25, "prune": 0.5, "prune_epochs": 1},
                prune_from="sep-0.25",
            ),
            Variant(
                "sep-0.25-kd",
                "alpha 0.25 distilled from std-0.25",
                {"alpha": 0.25},
                teacher="std-0.25",
            ),
        ),
        bench_seconds=0.2,
    ),
}


class SweepError(RuntimeError):
    """A variant failed to build or to measure; the message names it."""


#: ``builder(recipe, settings, out_dir) -> exit code``: one build, as ``python -m model build``.
Builder = Callable[[str, dict[str, Any], Path], int]


def default_builder(recipe: str, settings: dict[str, Any], out: Path) -> int:
    from model.build import build
    from model.recipes import resolve

    return build(resolve(recipe, overrides=settings), out)


def variant_settings(recipe: SweepRecipe, variant: Variant, out: Path, base: dict) -> dict:
    """The exact build settings of ``variant``: what its ``result.json`` is compared against."""
    settings = {**recipe.settings, **base, **variant.settings}
    if variant.int8:
        settings["int8"] = True
    if variant.prune_from:
        # Pruning starts from the trained network: no training from scratch, only fine-tuning.
        settings["init_checkpoint"] = str(out / variant.prune_from / "checkpoint.pt")
        settings["epochs"] = 0
    if variant.teacher:
        settings["teacher"] = str(out / variant.teacher / "model.onnx")
    settings.setdefault("name", f"mobilenet_v1-{variant.name}")
    return dict(sorted(settings.items()))


# ------------------------------------------------------------------------------- measurement


def _timed(session, feed: dict, seconds: float, max_runs: int) -> list[float]:
    times = []
    stop = time.perf_counter() + seconds
    while len(times) < max_runs and (len(times) < 3 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return times


def _open(path: Path):
    """A CPU ORT session (default threads, as the service's) and its batch-1 and -32 feeds."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    _, c, h, w = inp.shape
    rng = np.random.default_rng(0)
    feeds = {b: {inp.name: rng.standard_normal((b, c, h, w)).astype(np.float32)} for b in (1, 32)}
    for feed in feeds.values():
        for _ in range(3):  # warm-up: the first runs allocate and pick kernels
            session.run(None, feed)
    return session, feeds


def _figures(b1_seconds: float, b32_seconds: float, session) -> dict[str, Any]:
    return {
        "latency_ms_b1": round(b1_seconds * 1e3, 4),
        "images_per_s_b32": round(32 / b32_seconds, 1),
        "ort_threads": session.get_session_options().intra_op_num_threads or os.cpu_count(),
    }


def measure_latency(path: Path, *, seconds: float = 2.0) -> dict[str, Any]:
    """Median batch-1 latency and batch-32 throughput of one model, timed alone."""
    session, feeds = _open(path)
    b1 = statistics.median(_timed(session, feeds[1], seconds, 2000))
    b32 = statistics.median(_timed(session, feeds[32], seconds, 500))
    return _figures(b1, b32, session)


def time_together(paths: list[Path], *, seconds: float, rounds: int = 5) -> dict[str, dict]:
    """Every model timed round-robin in one window: the median of each one's per-round medians.

    On a shared machine the load changes from one minute to the next; models timed one after
    the other at build time (up to an hour apart) are not comparable, models timed in turns
    within the same minute are.
    """
    from model.data import progress

    opened = {str(p): _open(p) for p in paths}
    samples: dict[str, dict[int, list[float]]] = {p: {1: [], 32: []} for p in opened}
    for _ in progress(range(rounds), desc="timing", unit="round"):
        for path, (session, feeds) in opened.items():
            for batch in (1, 32):
                runs = _timed(session, feeds[batch], seconds / rounds, 2000 if batch == 1 else 500)
                samples[path][batch].append(statistics.median(runs))
    return {
        path: _figures(
            statistics.median(samples[path][1]), statistics.median(samples[path][32]), session
        )
        for path, (session, _) in opened.items()
    }


def measure_model(path: Path, variant: Variant, *, seconds: float) -> dict[str, Any]:
    """One row of the table: what the model file says about itself, its cost and its speed."""
    from sepconv.cost import LayerKind, analyze_model
    from sepconv.spec import read_spec

    spec = read_spec(str(path))
    report = analyze_model(path)
    first = report.layers[0]
    return {
        "variant": variant.name + ("-int8" if spec.precision == "int8" else ""),
        "description": variant.description + (", INT8" if spec.precision == "int8" else ""),
        "file": str(path),
        "precision": spec.precision,
        "alpha": spec.alpha,
        "conv": spec.conv,
        "prune_ratio": spec.prune_ratio,
        "teacher": variant.teacher or "",
        "accuracy": spec.test_accuracy,
        "mult_adds": report.totals.mult_adds,
        "params": report.totals.params,
        "stem_channels": first.output_channels,
        # Stem and every block's output: what pruning changes (depthwise layers follow them).
        "widths": [
            layer.output_channels
            for layer in report.layers
            if layer.kind in (LayerKind.STANDARD, LayerKind.POINTWISE)
        ],
        **measure_latency(path, seconds=seconds),
    }


# ----------------------------------------------------------------------------------- the run


def _load_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # the done marker appears whole or not at all


def run_sweep(
    recipe_name: str,
    out: Path,
    *,
    base: dict[str, Any] | None = None,
    only: list[str] | None = None,
    builder: Builder = default_builder,
    remeasure: bool = False,
) -> list[dict[str, Any]]:
    """Build and measure every variant not already done; return every row, in plan order.

    When anything was built (or ``remeasure``), every model is then timed again, all together.
    """
    from model.data import progress

    recipe = SWEEPS[recipe_name]
    names = [v.name for v in recipe.variants]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}; the plan has {', '.join(names)}"
        )
    wanted = _with_dependencies(recipe, only) if only else set(names)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    plan = [v for v in recipe.variants if v.name in wanted]
    by_name = {v.name: v for v in recipe.variants}
    results: dict[Path, dict[str, Any]] = {}
    built = False
    for variant in progress(plan, desc="sweep", unit="variant"):
        vdir = out / variant.name
        settings = variant_settings(recipe, variant, out, base or {})
        result_path = vdir / RESULT_FILE
        done = _load_result(result_path)
        # A variant built from another (pruned from it, taught by it) is stale when that one
        # was built with other settings, even if its own settings are unchanged.
        needs = {
            dep: variant_settings(recipe, by_name[dep], out, base or {})
            for dep in (variant.prune_from, variant.teacher)
            if dep
        }
        if (
            done
            and done.get("settings") == settings
            and done.get("needs", {}) == needs
            and done.get("schema") == RESULT_SCHEMA
        ):
            log.info("%s: already built (%s), skipped", variant.name, result_path)
            rows.extend(done["rows"])
            results[result_path] = done
            continue
        if done:
            log.info("%s: settings changed since %s, building again", variant.name, result_path)
        log.info("%s: building (%s)", variant.name, variant.description)
        started = time.perf_counter()
        code = builder(recipe.build_recipe, settings, vdir)
        seconds = time.perf_counter() - started
        if code != 0:
            raise SweepError(f"variant {variant.name} failed to build (exit {code}); see {vdir}")
        result = {
            "schema": RESULT_SCHEMA,
            "variant": variant.name,
            "settings": settings,
            "needs": needs,
            "build_seconds": round(seconds, 1),
            "rows": _measure(vdir, variant, recipe, round(seconds, 1)),
        }
        _write_json(result_path, result)
        rows.extend(result["rows"])
        results[result_path] = result
        built = True
    if rows and (built or remeasure):
        # The figures in the table are timed together, so they compare fairly (the per-build
        # figures stay in each result.json only until then).
        log.info("timing %d model(s) together", len(rows))
        timings = time_together([Path(r["file"]) for r in rows], seconds=recipe.bench_seconds)
        for row in rows:
            row.update(timings[row["file"]])
        for path, result in results.items():
            _write_json(path, result)
    return rows


def _measure(
    vdir: Path, variant: Variant, recipe: SweepRecipe, build_seconds: float
) -> list[dict[str, Any]]:
    files = [vdir / "model.onnx"] + ([vdir / "model.int8.onnx"] if variant.int8 else [])
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SweepError(f"variant {variant.name}: the build left no {', '.join(missing)}")
    rows = [measure_model(f, variant, seconds=recipe.bench_seconds) for f in files]
    for row in rows:
        row["build_seconds"] = build_seconds
    return rows


def _with_dependencies(recipe: SweepRecipe, only: list[str]) -> set[str]:
    by_name = {v.name: v for v in recipe.variants}
    wanted, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        variant = by_name[name]
        todo += [d for d in (variant.prune_from, variant.teacher) if d]
    return wanted


# ----------------------------------------------------------------------------------- the CLI

_RECIPE_NOTES = {
    "quick": "the `quick` build recipe at 4 epochs for every variant (so that the sweep fits in "
    "about 30 minutes on 2 CPU cores; the `quick` build itself trains 8), pruned variants "
    "fine-tuned for 2 epochs from their source's best checkpoint, the distilled one taught by "
    "`sep-1.0`'s export",
    "full": "the `full` build recipe (60 epochs, for a GPU) for every variant, pruned variants "
    "fine-tuned for 15 epochs, the distilled one taught by `sep-1.0`'s export",
    "smoke": "the `smoke` build recipe at 1 epoch (a check that the sweep works, not a result)",
}


def _machine() -> str:
    from sepconv.hardware import available_cores

    cores = available_cores()
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} CPU core(s){', ' + name if name else ''}"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="build and measure the optimisation variants; write docs/results/optimization.md",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--recipe",
        choices=list(SWEEPS),
        default="quick",
        help="quick: about 30 min on 2 CPU cores; full: for a GPU; smoke: seconds",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("artifacts/sweep"),
        help="one folder per variant, reused by later runs",
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=Path("docs/results/optimization.md"),
        help="the report to write, its plot beside it as .png (default: %(default)s)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="VARIANT",
        help="build only these variants (and those they need)",
    )
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="time already built variants again instead of reusing their figures",
    )
    p.add_argument("--data", help="fashion-mnist (default) or an image folder")
    p.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--input-size", type=int, help="square input side in pixels")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="each build trains a few batches (a CI smoke test of the sweep)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from model.data import DataError

    base = {
        k: v
        for k, v in {
            "data": args.data,
            "data_dir": args.data_dir,
            "input_size": args.input_size,
            "device": args.device,
            "seed": args.seed,
            "dry_run": args.dry_run,
        }.items()
        if v is not None
    }
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            rows = run_sweep(
                args.recipe, args.out, base=base, only=args.only, remeasure=args.remeasure
            )
    except (SweepError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, SweepError) else 2
    write(rows, args.recipe, args.out, args.doc, base)
    return 0


def write(rows, recipe: str, out: Path, doc: Path, base: dict) -> tuple[Path, Path | None]:
    from model.recipes import resolve
    from model.sweep_report import write_report

    config = resolve(SWEEPS[recipe].build_recipe, overrides=base)
    meta = {
        "recipe": recipe,
        "recipe_note": _RECIPE_NOTES[recipe],
        "data": config.data,
        "seed": config.seed,
        "out": str(out),
        "machine": _machine(),
        "ort_threads": rows[0]["ort_threads"] if rows else "?",
    }
    doc_path, plot = write_report(rows, doc, meta)
    log.info("wrote %s%s", doc_path, f" and {plot}" if plot else "")
    return doc_path, plot
