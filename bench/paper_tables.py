"""Reproduce the MobileNet paper's cost tables from untrained exports (Howard et al. 2017).

Exports MobileNetV1 (1000 classes, RGB) for each width multiplier at 224 px and for each input
size at alpha 1.0, counts every ONNX graph with :mod:`sepconv.cost`, and prints the exact counts
next to the paper's printed figures (Tables 2, 4, 6 and 7). Table 4's full-convolution row is
counted on a real export with every separable pair replaced by a standard 3x3 conv
(``MobileNetV1(conv="standard")``), and checked against the separable export's "full conv"
figure. The printed figures below are the only numbers typed in by hand; everything else is
counted.

    .venv/bin/python bench/paper_tables.py            # Markdown, as pasted into docs/cost.md
    .venv/bin/python bench/paper_tables.py --json     # the raw counts

Needs the build extra (torch); a few seconds per export.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# The paper's printed figures: mult-adds and params in millions.
TABLE_6 = {1.0: (569, 4.2), 0.75: (325, 2.6), 0.5: (149, 1.3), 0.25: (41, 0.5)}  # at 224 px
TABLE_7 = {224: 569, 192: 418, 160: 290, 128: 186}  # alpha 1.0, params 4.2M throughout
TABLE_4 = {"Conv MobileNet": (4866, 29.3), "MobileNet": (569, 4.2)}
#: Table 2, per cent of mult-adds and of parameters per layer type (alpha 1.0, 224 px).
TABLE_2 = {
    "Conv 1x1": (94.86, 74.59),
    "Conv DW 3x3": (3.06, 1.06),
    "Conv 3x3": (1.19, 0.02),
    "Fully connected": (0.18, 24.33),
}


def export(alpha: float, size: int, out_dir: Path, conv: str = "separable") -> Path:
    from model.export import export_onnx
    from model.network import MobileNetV1
    from sepconv.spec import ModelSpec

    spec = ModelSpec(
        name=f"mobilenet_v1-{alpha}-{size}",
        labels=[f"class_{i}" for i in range(1000)],
        input_size=size,
        color_mode="RGB",
        mean=[0.5] * 3,
        std=[0.25] * 3,
        alpha=alpha,
        conv=conv,
    )
    net = MobileNetV1(num_classes=1000, in_channels=3, alpha=alpha, conv=conv)
    return export_onnx(net, spec, out_dir / f"mobilenet_{conv}_{alpha}_{size}.onnx")


def count(configs: list[tuple]) -> dict[tuple, object]:
    """Cost reports keyed by (alpha, size) for separable exports, (alpha, size, conv) otherwise."""
    from sepconv.cost import analyze_model

    reports = {}
    with tempfile.TemporaryDirectory(prefix="sepconv-paper-") as tmp:
        for config in configs:
            alpha, size, *conv = config
            reports[config] = analyze_model(export(alpha, size, Path(tmp), *conv))
    return reports


def _cells(exact: int, printed: float, decimals: int) -> str:
    """Exact count, rounded the way the paper prints it, the printed figure, and a verdict."""
    rounded = round(exact / 1e6, decimals)
    verdict = "yes" if rounded == printed else "**no**"
    return f"{exact:,} | {rounded:.{decimals}f}M | {printed:.{decimals}f}M | {verdict}"


def markdown(reports) -> str:
    lines = [
        "| Model (paper table) | Mult-adds, exact | Rounded | Paper | Same | "
        "Params, exact | Rounded | Paper | Same |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(f"{a} MobileNet-224 (6)", (a, 224), *TABLE_6[a]) for a in TABLE_6]
    rows += [(f"1.0 MobileNet-{s} (7)", (1.0, s), TABLE_7[s], 4.2) for s in TABLE_7 if s != 224]
    t = reports[(1.0, 224)].totals
    std = reports[(1.0, 224, "standard")].totals
    for name, key, p_macs, p_params in rows:
        r = reports[key].totals
        lines.append(
            f"| {name} | {_cells(r.mult_adds, p_macs, 0)} | {_cells(r.params, p_params, 1)} |"
        )
    for name, macs, params in [
        ("Conv MobileNet", std.mult_adds, std.params),
        ("MobileNet", t.mult_adds, t.params),
    ]:
        p_macs, p_params = TABLE_4[name]
        lines.append(
            f"| {name}-224 (4) | {_cells(macs, p_macs, 0)} | {_cells(params, p_params, 1)} |"
        )
    same = std.mult_adds == t.full_conv_mult_adds and std.params == t.full_conv_params
    lines += [
        "",
        f"Conv MobileNet is counted on a standard-conv export; the separable export's own "
        f"full-conv figure is {t.full_conv_mult_adds:,} mult-adds and {t.full_conv_params:,} "
        f"params: {'the same, exactly' if same else '**different**'}.",
        "",
        "| Layer type (Table 2, 1.0-224) | Mult-adds, exact | Paper | Params, exact | Paper |",
        "|---|---|---|---|---|",
    ]
    shares = {s.label: s for s in reports[(1.0, 224)].shares}
    for label, (p_macs, p_params) in TABLE_2.items():
        s = shares[label]
        lines.append(
            f"| {label} | {s.mult_adds_share * 100:.2f}% | {p_macs:.2f}% | "
            f"{s.params_share * 100:.2f}% | {p_params:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the raw counts as JSON")
    args = parser.parse_args(argv)
    configs = [(a, 224) for a in TABLE_6] + [(1.0, s) for s in TABLE_7 if s != 224]
    configs.append((1.0, 224, "standard"))
    reports = count(configs)
    if args.json:
        out = {
            "-".join(map(str, key)): r.totals.model_dump()
            | {"shares": [x.model_dump() for x in r.shares]}
            for key, r in reports.items()
        }
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
