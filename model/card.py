"""The model card: what was built, from what, how long it took and how well it does.

Written as ``model_card.json`` (for tools) and ``model_card.md`` (for people) next to the model.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "pillow")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def write_card(out_dir: str | Path, card: dict[str, Any]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "model_card.json", out_dir / "model_card.md"
    json_path.write_text(json.dumps(card, indent=2) + "\n")
    md_path.write_text(render_markdown(card))
    return json_path, md_path


def render_markdown(card: dict[str, Any]) -> str:
    spec, cfg, res = card["spec"], card["config"], card["results"]
    lines = [
        f"# {spec['name']} {spec['version']}: MobileNetV1 alpha {spec['alpha']:g}, "
        f"{spec['input_size']} px {spec['color_mode']}",
        "",
        f"Built {spec['build_date']} with recipe `{cfg['recipe']}` on {card['device']}.",
        "",
        "| | |",
        "|---|---|",
        f"| Data | {spec['dataset'] or 'none (untrained)'} |",
        f"| Train / test images | {card['train_images']} / {card['test_images']} |",
        f"| Classes | {len(spec['labels'])} |",
        f"| Width multiplier (alpha) | {spec['alpha']:g} |",
        f"| Input | {spec['input_size']}x{spec['input_size']} {spec['color_mode']}, "
        f"stem stride {spec['stem_stride']}, resize {spec['resize']} |",
        f"| Parameters | {card['parameters']:,} |",
        f"| Epochs (best) | {spec['epochs']} ({res['best_epoch']}) |",
        f"| Training wall time | {res['train_seconds']:.1f} s |",
        f"| Build wall time | {res['build_seconds']:.1f} s |",
        f"| Test accuracy, PyTorch | {_pct(res['torch_accuracy'])} |",
        f"| Test accuracy, ONNX Runtime | {_pct(res['onnx_accuracy'])} |",
        f"| Max abs logit difference ORT vs PyTorch | {res['max_abs_diff']:.2e} "
        f"({res['compared_on']}; tolerance {res['tolerance']:g}) |",
    ]
    if res.get("int8_accuracy") is not None or res.get("int8_path"):
        lines.append(f"| Test accuracy, ONNX Runtime INT8 | {_pct(res.get('int8_accuracy'))} |")
    lines += _optimization_rows(card.get("optimization") or {}, spec)
    lines += [
        f"| Verification | {'passed' if res['verified'] else 'FAILED'} |",
        f"| Data fingerprint (sha256) | `{spec['data_fingerprint'] or 'n/a'}` |",
        f"| Mean / std | {spec['mean']} / {spec['std']} |",
        f"| Versions | {', '.join(f'{k} {v}' for k, v in card['versions'].items())} |",
        "",
    ]
    if res.get("problems"):
        lines += ["## Problems", ""] + [f"- {p}" for p in res["problems"]] + [""]
    pruning = (card.get("optimization") or {}).get("pruning") or {}
    if card.get("history"):
        lines += [
            "## Training history",
            "",
            "| Epoch | Train loss | Train acc | Test loss | Test acc | img/s | Seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for h in card["history"]:
            lines.append(
                f"| {h['epoch']} | {h['train_loss']:.4f} | {_pct(h['train_accuracy'])} | "
                f"{h['test_loss']:.4f} | {_pct(h['test_accuracy'])} | "
                f"{h['images_per_second']:.0f} | {h['seconds']:.1f} |"
            )
        lines.append("")
    if pruning.get("history"):
        lines += [
            "## Fine-tuning after pruning",
            "",
            "| Epoch | Train loss | Train acc | Test loss | Test acc | img/s | Seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for h in pruning["history"]:
            lines.append(
                f"| {h['epoch']} | {h['train_loss']:.4f} | {_pct(h['train_accuracy'])} | "
                f"{h['test_loss']:.4f} | {_pct(h['test_accuracy'])} | "
                f"{h['images_per_second']:.0f} | {h['seconds']:.1f} |"
            )
        lines.append("")
    lines += ["## Labels", "", ", ".join(f"`{label}`" for label in spec["labels"][:50])]
    if len(spec["labels"]) > 50:
        lines[-1] += f", ... ({len(spec['labels'])} in all)"
    lines.append("")
    return "\n".join(lines)


def _optimization_rows(opt: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """How the network was made cheaper: convolution type, pruning, distillation, precision."""
    conv = spec.get("conv", "separable")
    rows = [
        "| Convolutions | "
        + (
            "standard 3x3 in place of each separable pair (the paper's Table 4 baseline)"
            if conv == "standard"
            else "depthwise-separable (3x3 depthwise + 1x1 pointwise)"
        )
        + " |",
        f"| Precision | {spec.get('precision', 'fp32')} |",
    ]
    if opt.get("init_checkpoint"):
        rows.append(f"| Started from | `{opt['init_checkpoint']}` |")
    pruning = opt.get("pruning")
    if pruning:
        tuned = (
            f"fine-tuned {pruning['fine_tune_epochs']} epoch(s) at lr "
            f"{pruning.get('fine_tune_lr', 0):g}"
            if pruning["fine_tune_epochs"]
            else "not fine-tuned"
        )
        rows += [
            f"| Pruning | {100 * pruning['ratio']:g}% of every layer's output channels removed "
            f"(Torch-Pruning, L2 magnitude), {tuned}; parameters {pruning['params_before']:,} "
            f"-> {pruning['params_after']:,}; PyTorch test accuracy before pruning "
            f"{_pct(pruning['accuracy_before'])} |",
            f"| Widths (stem, blocks) | {pruning['widths_before']} -> {pruning['widths_after']} |",
        ]
    else:
        rows.append("| Pruning | none |")
    kd = opt.get("distillation")
    if kd:
        logits = (
            "computed once, no augmentation"
            if kd["teacher_logits"] == "cached"
            else "on each augmented batch"
        )
        rows.append(
            f"| Distillation | from {kd['teacher']}; temperature {kd['temperature']:g}, "
            f"soft-target weight {kd['weight']:g}; teacher logits {logits} |"
        )
    else:
        rows.append("| Distillation | none |")
    return rows
