"""``docs/results/optimization.md`` and its plot from the sweep's rows: the table, the Pareto
frontier and what each optimisation bought, every figure computed from the rows (nothing typed
in by hand).
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def pareto_frontier(rows: list[Row]) -> list[str]:
    """Variants no other variant beats on both batch-1 latency and accuracy, fastest first.

    A row is dominated when another is at least as fast and at least as accurate, and strictly
    better in one of the two.
    """
    usable = [r for r in rows if r.get("accuracy") is not None]
    front = []
    for r in usable:
        dominated = any(
            o is not r
            and o["latency_ms_b1"] <= r["latency_ms_b1"]
            and o["accuracy"] >= r["accuracy"]
            and (o["latency_ms_b1"] < r["latency_ms_b1"] or o["accuracy"] > r["accuracy"])
            for o in usable
        )
        if not dominated:
            front.append(r)
    return [r["variant"] for r in sorted(front, key=lambda r: r["latency_ms_b1"])]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _m(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def _by_name(rows: list[Row]) -> dict[str, Row]:
    return {r["variant"]: r for r in rows}


def findings(rows: list[Row]) -> list[str]:
    """One sentence per comparison the sweep was built to make, where both rows exist."""
    r = _by_name(rows)
    out = []

    def acc_delta(a: Row, b: Row) -> str:
        if a["accuracy"] is None or b["accuracy"] is None:
            return "accuracy n/a"
        return f"{100 * (a['accuracy'] - b['accuracy']):+.2f} points of accuracy"

    def vs(a: str, b: str, what: str) -> None:
        if a in r and b in r:
            x, y = r[a], r[b]
            out.append(
                f"**{what}** (`{a}` against `{b}`): {acc_delta(x, y)}, "
                f"{x['mult_adds'] / y['mult_adds']:.2f}x the mult-adds, "
                f"{x['params'] / y['params']:.2f}x the parameters, "
                f"{x['latency_ms_b1'] / y['latency_ms_b1']:.2f}x the batch-1 latency, "
                f"{x['images_per_s_b32'] / y['images_per_s_b32']:.2f}x the batch-32 throughput."
            )

    vs("std-0.25", "sep-0.25", "Standard instead of separable convs")
    vs("std-1.0", "sep-1.0", "Standard instead of separable convs at alpha 1.0 (Table 4)")
    vs("sep-0.5", "sep-0.25", "Width 0.5 instead of 0.25")
    vs("sep-1.0", "sep-0.25", "Width 1.0 instead of 0.25")
    vs("sep-0.5-pruned-50", "sep-0.5", "Pruning half the channels of alpha 0.5")
    vs("sep-0.5-pruned-50", "sep-0.25", "Alpha 0.5 pruned to half its width, against alpha 0.25")
    vs("sep-0.25-pruned-25", "sep-0.25", "Pruning a quarter of alpha 0.25's channels")
    vs("sep-0.25-pruned-50", "sep-0.25", "Pruning half of alpha 0.25's channels")
    vs("sep-0.25-kd", "sep-0.25", "Distillation")
    vs("sep-0.25-int8", "sep-0.25", "INT8 at alpha 0.25")
    vs("sep-1.0-int8", "sep-1.0", "INT8 at alpha 1.0")
    return out


def render_markdown(rows: list[Row], meta: dict[str, Any], plot_name: str | None) -> str:
    front = set(pareto_frontier(rows))
    base = _by_name(rows).get("sep-0.25")
    lines = [
        "# What each optimisation buys, measured",
        "",
        "Written by `python -m model sweep` "
        f"(`--recipe {meta['recipe']}`): every variant is an ordinary `python -m model build` on "
        f"the same data ({meta['data']}) with the same seed ({meta['seed']}); "
        f"{meta['recipe_note']}. Accuracy is on the test split, measured through ONNX Runtime; "
        "mult-adds and parameters are the cost report's exact counts (batch 1, BN folded); "
        "latency is the median `session.run` at batch 1 and throughput is 32 / the median "
        f"batch-32 time, one CPU ORT session with {meta['ort_threads']} intra-op thread(s) on "
        f"{meta['machine']}. Latency on a shared machine varies by 10-20% from run to run.",
        "",
        f"Generated {meta['date']} from the rows in `{meta['out']}` (each variant's "
        "`result.json`).",
        "",
        "| Variant | What | ORT test accuracy | vs `sep-0.25` | Mult-adds | Params | "
        "Batch-1 latency | Batch-32 images/s | Build time | Pareto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        delta = (
            f"{100 * (r['accuracy'] - base['accuracy']):+.2f}"
            if base and r["accuracy"] is not None and base["accuracy"] is not None
            else "-"
        )
        build = f"{r['build_seconds'] / 60:.1f} min" if r.get("build_seconds") else "-"
        lines.append(
            f"| `{r['variant']}` | {r['description']} | {_pct(r['accuracy'])} | {delta} | "
            f"{r['mult_adds']:,} ({_m(r['mult_adds'])}) | {r['params']:,} | "
            f"{r['latency_ms_b1']:.3f} ms | {r['images_per_s_b32']:,.0f} | {build} | "
            f"{'**yes**' if r['variant'] in front else ''} |"
        )
    lines += [""]
    if plot_name:
        lines += [f"![accuracy against batch-1 latency]({plot_name})", ""]
    lines += [
        "The Pareto frontier (no other variant is both faster at batch 1 and more accurate): "
        + ", ".join(f"`{name}`" for name in pareto_frontier(rows))
        + ".",
        "",
        "## What each choice bought",
        "",
    ]
    lines += [f"- {sentence}" for sentence in findings(rows)] + [""]
    widths = [r for r in rows if r.get("prune_ratio")]
    if widths:
        lines += ["## Pruned widths (stem, then each block's output channels)", ""]
        for r in widths:
            lines.append(f"- `{r['variant']}`: {r['widths']}")
        lines.append("")
    lines += [
        "Rebuild this page: `python -m model sweep --recipe "
        f"{meta['recipe']}` (variants already built are skipped; `--remeasure` times them "
        "again without rebuilding).",
        "",
    ]
    return "\n".join(lines)


def write_plot(rows: list[Row], path: Path) -> Path:
    """Accuracy against batch-1 latency, every variant labelled, the frontier as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    usable = [r for r in rows if r.get("accuracy") is not None]
    front_names = pareto_frontier(usable)
    by_name = _by_name(usable)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in usable:
        on = r["variant"] in front_names
        marker = "s" if r["precision"] == "int8" else ("^" if r["conv"] == "standard" else "o")
        ax.scatter(
            r["latency_ms_b1"],
            100 * r["accuracy"],
            marker=marker,
            s=60,
            color="tab:red" if on else "tab:blue",
            zorder=3,
        )
        ax.annotate(
            r["variant"],
            (r["latency_ms_b1"], 100 * r["accuracy"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    if front_names:
        xs, ys = [], []
        for name in front_names:
            r = by_name[name]
            if xs:  # a step: accuracy only rises once the slower variant is reached
                xs.append(r["latency_ms_b1"])
                ys.append(ys[-1])
            xs.append(r["latency_ms_b1"])
            ys.append(100 * r["accuracy"])
        ax.plot(xs, ys, color="tab:red", linewidth=1.2, label="Pareto frontier", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency through ONNX Runtime, ms (log scale)")
    ax.set_ylabel("test accuracy through ONNX Runtime, %")
    ax.set_title("Accuracy against latency (circle: separable, triangle: standard, square: INT8)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(rows: list[Row], doc: Path, meta: dict[str, Any]) -> tuple[Path, Path | None]:
    """Write ``doc`` and, when matplotlib is installed (the ``bench`` extra), the plot beside it."""
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}",
        **meta,
    }
    plot: Path | None = doc.with_suffix(".png")
    try:
        write_plot(rows, plot)
    except ImportError:
        plot = None
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_markdown(rows, meta, plot.name if plot else None))
    return doc, plot
