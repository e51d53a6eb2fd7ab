"""Build recipes: named defaults that command-line flags override (timm's config-then-CLI order).

The resolved configuration is written next to the model as ``build_config.json``, so a build can
be repeated exactly with ``--config DIR/build_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class BuildConfig:
    recipe: str = "quick"
    data: str = "fashion-mnist"
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    #: ``None``: from the data (Fashion-MNIST: L; a folder: L if every image is greyscale).
    color: Literal["L", "RGB"] | None = None
    test_fraction: float = 0.2
    classes: int | None = None
    alpha: float = 0.25
    input_size: int = 28
    #: ``None``: 1 for inputs up to 64 px (so the 32x downsampling does not collapse the map).
    stem_stride: int | None = None
    dropout: float = 0.0
    epochs: int = 8
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "sgd"
    lr: float = 0.4
    weight_decay: float = 5e-5
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    #: Augmentation, applied on whole batches in torch: random crop from a zero-padded image,
    #: horizontal flip, random erasing.
    crop_padding: int = 0
    hflip: bool = True
    erase_prob: float = 0.0
    train_limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    #: Train only this many batches per epoch and test on a few hundred images (CI smoke).
    dry_run: bool = False
    int8: bool = False
    calibration_size: int = 500
    name: str = "mobilenet_v1"
    version: str = "1"

    def resolved_stem_stride(self) -> int:
        if self.stem_stride is not None:
            return self.stem_stride
        return 1 if self.input_size <= 64 else 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


RECIPES: dict[str, dict[str, Any]] = {
    # The default: a 2-core CPU builds it in about five minutes. Eight epochs leave the network
    # still underfitting, so it gets only flips: random crops cost 1.4 points of test accuracy
    # at this budget (90.6% against 92%, see the README).
    "quick": {},
    # For a GPU: wider, longer, stronger augmentation (random erasing) and SGD + Nesterov.
    "full": {
        "alpha": 1.0,
        "epochs": 60,
        "batch_size": 256,
        "lr": 0.1,
        "schedule": "cosine",
        "warmup_epochs": 3,
        "crop_padding": 4,
        "erase_prob": 0.5,
        "dropout": 0.2,
    },
    # Seconds: CI and the container end-to-end test check that the pipeline works; two epochs
    # on 3,000 images still give a model whose answers are better than chance.
    "smoke": {
        "epochs": 2,
        "train_limit": 3000,
        "test_limit": 1000,
        "batch_size": 100,
        "calibration_size": 100,
    },
}


def resolve(
    recipe: str = "quick",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> BuildConfig:
    """Recipe defaults, then a JSON config file, then explicit overrides (``None`` = not given)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values: dict[str, Any] = {"recipe": recipe, **RECIPES[recipe]}
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    if config_file is not None:
        loaded = json.loads(Path(config_file).read_text())
        unknown = sorted(set(loaded) - fields)
        if unknown:
            raise ValueError(f"{config_file}: unknown setting(s) {', '.join(unknown)}")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    config = BuildConfig(**values)
    _validate(config)
    return config


def _validate(c: BuildConfig) -> None:
    problems = []
    if not 0 < c.alpha <= 1:
        problems.append(f"alpha must be in (0, 1], got {c.alpha}")
    if c.input_size < 8:
        problems.append(f"input size must be at least 8 px, got {c.input_size}")
    if c.epochs < 0:
        problems.append(f"epochs must be >= 0, got {c.epochs}")
    if c.batch_size < 1 or c.eval_batch_size < 1:
        problems.append("batch sizes must be positive")
    if c.classes is not None and c.classes < 2:
        problems.append(f"classes must be at least 2, got {c.classes}")
    if c.stem_stride not in (None, 1, 2):
        problems.append(f"stem stride must be 1 or 2, got {c.stem_stride}")
    if not 0 <= c.label_smoothing < 1:
        problems.append(f"label smoothing must be in [0, 1), got {c.label_smoothing}")
    if not 0 <= c.erase_prob <= 1:
        problems.append(f"erase probability must be in [0, 1], got {c.erase_prob}")
    if c.crop_padding < 0:
        problems.append(f"crop padding must be >= 0, got {c.crop_padding}")
    if problems:
        raise ValueError("; ".join(problems))
