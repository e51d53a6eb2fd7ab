"""The cost report as Markdown or aligned text, for people (JSON is the schema's own dump)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sepconv.cost.report import CostReport, LayerCost, ProfileReport

#: (title, paragraphs, column headers, rows): what every renderer lays out.
Section = tuple[str, list[str], list[str], list[list[str]]]


def _m(value: int) -> str:
    """Millions with two decimals: how the paper prints mult-adds and params."""
    return f"{value / 1e6:,.2f}M"


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def _layer_shape(layer: LayerCost, side: Literal["input", "output"]) -> str:
    channels = layer.input_channels if side == "input" else layer.output_channels
    h = layer.input_h if side == "input" else layer.output_h
    w = layer.input_w if side == "input" else layer.output_w
    return f"{h}x{w}x{channels}" if h is not None else f"{channels}"


def _sections(report: CostReport) -> list[Section]:
    """Every section in order; the renderers only lay them out."""
    sections = [_summary(report), _shares_section(report)]
    if report.separable_pairs:
        sections.append(_pairs_section(report))
    sections.append(_layers_section(report))
    if report.profile is not None:
        sections.append(_profile_section(report.profile))
    return sections


def _summary(report: CostReport) -> Section:
    t = report.totals
    model = report.model
    who = f"{model.name} v{model.version}" if model.name else Path(model.path).name or "model"
    summary = [
        f"{who}: input {'x'.join(map(str, model.input_shape))} (batch 1), "
        f"{len(report.layers)} Conv/Gemm/MatMul layers, opset {model.opset}.",
        f"Total: {t.mult_adds:,} mult-adds ({_m(t.mult_adds)}), {t.params:,} params "
        f"({_m(t.params)}); BN folded: {'yes' if t.bn_folded else 'no'} "
        f"({t.batchnorm_nodes} BatchNormalization nodes"
        + (f", {t.other_params:,} BN params not counted above" if t.other_params else "")
        + ").",
        f"With every separable pair replaced by a standard conv: {t.full_conv_mult_adds:,} "
        f"mult-adds ({_m(t.full_conv_mult_adds)}, {t.mult_adds_reduction:.2f}x more), "
        f"{t.full_conv_params:,} params ({_m(t.full_conv_params)}, "
        f"{t.params_reduction:.2f}x more).",
    ]
    return ("Cost report", summary, [], [])


def _shares_section(report: CostReport) -> Section:
    share_rows = [
        [
            s.label,
            str(s.layers),
            f"{s.mult_adds:,}",
            _pct(s.mult_adds_share),
            f"{s.params:,}",
            _pct(s.params_share),
            f"{s.arithmetic_intensity:.1f}",
        ]
        for s in report.shares
    ]
    return (
        "Share per layer kind",
        ["Mult-adds and parameters per layer kind (the MobileNet paper's Table 2)."],
        ["Kind", "Layers", "Mult-adds", "Share", "Params", "Share", "MAC/byte"],
        share_rows,
    )


def _pairs_section(report: CostReport) -> Section:
    pair_rows = [
        [
            f"{p.depthwise} + {p.pointwise}",
            f"{p.kernel_h}x{p.kernel_w}/"
            + (f"{p.stride_h}" if p.stride_h == p.stride_w else f"{p.stride_h}x{p.stride_w}"),
            str(p.input_channels),
            str(p.output_channels),
            f"{p.output_h}x{p.output_w}",
            f"{p.standard_mult_adds:,}",
            f"{p.separable_mult_adds:,}",
            f"{p.ratio:.5f} ({p.ratio_exact})",
            f"{p.formula_ratio:.5f} ({p.formula_exact})",
            "yes" if p.agrees else "NO",
        ]
        for p in report.separable_pairs
    ]
    return (
        "Separable pairs",
        [
            "Standard conv Dk^2*M*N*Dp^2 against depthwise + pointwise "
            "Dk^2*M*Dp^2 + M*N*Dp^2; the ratio from the counts must equal "
            "1/N + 1/Dk^2 exactly."
        ],
        [
            "Depthwise + pointwise",
            "Dk/s",
            "M",
            "N",
            "Dp",
            "Standard",
            "Separable",
            "Ratio (counts)",
            "1/N + 1/Dk^2",
            "Equal",
        ],
        pair_rows,
    )


def _layers_section(report: CostReport) -> Section:
    layer_rows = [
        [
            layer.name,
            layer.weight,
            layer.label,
            _layer_shape(layer, "input"),
            f"{layer.kernel_h}x{layer.kernel_w}" if layer.kernel_h else "-",
            f"{layer.stride_h}x{layer.stride_w}" if layer.stride_h else "-",
            ",".join(map(str, layer.pads)) if layer.pads else "-",
            _layer_shape(layer, "output"),
            f"{layer.mult_adds:,}",
            f"{layer.params:,}",
        ]
        for layer in report.layers
    ]
    return (
        "Layers",
        ["Input and output are HxWxC at batch 1; pads are top,left,bottom,right."],
        [
            "Node",
            "Weight",
            "Kind",
            "Input",
            "Kernel",
            "Stride",
            "Pads",
            "Output",
            "Mult-adds",
            "Params",
        ],
        layer_rows,
    )


def _profile_section(p: ProfileReport) -> Section:
    timing_rows = [
        [
            k.label,
            f"{k.time_ms:.3f}",
            _pct(k.time_share),
            _pct(k.mult_adds_share),
            f"{k.gmacs_per_s:.2f}",
            f"{k.arithmetic_intensity:.1f}",
        ]
        for k in p.kinds
    ]
    timing_rows.append(
        [
            "other (pool, reshape, reorder)",
            f"{p.other_ms:.3f}",
            _pct(p.other_ms / p.kernel_ms if p.kernel_ms else 0.0),
            "-",
            "-",
            "-",
        ]
    )
    notes = [
        f"ONNX Runtime {p.onnxruntime_version} on {', '.join(p.providers)}, optimization "
        f"{p.optimization}, {p.intra_op_threads} intra-op thread(s), median of {p.runs} "
        f"runs after {p.warmup} warm-up: {p.wall_ms_median:.3f} ms per image wall, "
        f"{p.kernel_ms:.3f} ms in kernels."
    ]
    notes.extend(_memory_bound_note(p))
    return (
        "Measured (ONNX Runtime profile)",
        notes,
        ["Kind", "ms", "Time share", "Mult-add share", "GMAC/s", "MAC/byte"],
        timing_rows,
    )


def _memory_bound_note(profile: ProfileReport) -> list[str]:
    """Theory against practice in a sentence, worded from the measured numbers."""
    timed = [k for k in profile.kinds if k.time_ms > 0 and k.gmacs_per_s > 0]
    dw = [k for k in timed if k.label.startswith("Conv DW")]
    dense = [k for k in timed if not k.label.startswith("Conv DW")]
    if not dw or not dense:
        return []
    d = max(dw, key=lambda k: k.time_share)
    # The pointwise convs are the natural yardstick: they do most of the work.
    ref = max(dense, key=lambda k: k.mult_adds_share)
    head = (
        f"{d.label} does {_pct(d.mult_adds_share)} of the mult-adds and takes "
        f"{_pct(d.time_share)} of the kernel time: {d.gmacs_per_s:.2f} GMAC/s against "
        f"{ref.gmacs_per_s:.2f} GMAC/s for {ref.label}"
    )
    intensity = (
        f"{d.arithmetic_intensity:.1f} mult-adds per byte moved against "
        f"{ref.arithmetic_intensity:.1f}"
    )
    if d.gmacs_per_s < ref.gmacs_per_s:
        return [
            f"{head}, {ref.gmacs_per_s / d.gmacs_per_s:.1f}x slower per mult-add. At "
            f"{intensity}, it is bound by memory traffic, not arithmetic."
        ]
    return [f"{head}; at {intensity} this runtime still keeps it as busy per mult-add."]


def render_markdown(report: CostReport) -> str:
    out = []
    for title, paragraphs, headers, rows in _sections(report):
        out.append(f"### {title}\n")
        out.extend(f"{p}\n" for p in paragraphs)
        if headers:
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_text(report: CostReport) -> str:
    out = []
    for title, paragraphs, headers, rows in _sections(report):
        out.append(title)
        out.append("=" * len(title))
        out.extend(paragraphs)
        if headers:
            widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
            out.append("")
            out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
            out.append("  ".join("-" * w for w in widths))
            for row in rows:
                out.append(
                    "  ".join(
                        c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))
                    )
                )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render(report: CostReport, fmt: Literal["json", "markdown", "text"]) -> str:
    if fmt == "json":
        return report.model_dump_json(indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(report)
    return render_text(report)
