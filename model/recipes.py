"""Build recipes: named defaults that command-line flags override (timm's config-then-CLI order).

The resolved configuration is written next to the model as ``build_config.json``, so a build can
be repeated exactly with ``--config DIR/build_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class BuildConfig(BaseModel):
    """Every build setting; validated when built, so a bad value fails before any work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: str = "quick"
    data: str = "fashion-mnist"
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    #: ``None``: from the data (Fashion-MNIST: L; a folder: L if every image is greyscale).
    color: Literal["L", "RGB"] | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    classes: int | None = Field(None, ge=2)
    alpha: float = 0.25
    input_size: int = Field(28, ge=8)
    #: ``None``: 1 for inputs up to 64 px (so the 32x downsampling does not collapse the map).
    stem_stride: Literal[1, 2] | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(8, ge=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adamw", "sgd"] = "sgd"
    lr: float = Field(0.4, gt=0)
    weight_decay: float = Field(5e-5, ge=0)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: float = Field(0.3, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    #: Augmentation, applied on whole batches in torch: random crop from a zero-padded image,
    #: horizontal flip, random erasing.
    crop_padding: int = Field(0, ge=0)
    hflip: bool = True
    erase_prob: float = Field(0.0, ge=0, le=1)
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    #: Train only this many batches per epoch and test on a few hundred images (CI smoke).
    dry_run: bool = False
    int8: bool = False
    calibration_size: int = Field(500, ge=1)
    #: ``standard`` replaces every depthwise + pointwise pair with one full 3x3 conv (same
    #: stride and output channels): the paper's Table 4 baseline.
    conv: Literal["separable", "standard"] = "separable"
    #: Start from this checkpoint's architecture and weights instead of a fresh network (with
    #: ``epochs`` 0 nothing is trained before pruning: the way to prune a finished build).
    init_checkpoint: str | None = None
    #: Structured pruning after training: this share of every layer's output channels is
    #: removed (Torch-Pruning), then the network is fine-tuned for ``prune_epochs``.
    prune: float = Field(0.0, ge=0, lt=1)
    prune_epochs: int = Field(2, ge=0)
    #: Peak learning rate of the fine-tuning; ``None``: a tenth of ``lr``.
    prune_lr: float | None = Field(None, gt=0)
    #: Knowledge distillation: a checkpoint (.pt) or an ONNX model whose soft targets train the
    #: network, mixed with the labels as ``distill_weight`` * soft + (1 - weight) * hard.
    teacher: str | None = None
    distill_temperature: float = Field(4.0, gt=0)
    distill_weight: float = Field(0.9, ge=0, le=1)
    name: str = "mobilenet_v1"
    version: str = "1"

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {value}")
        return value

    def resolved_stem_stride(self) -> int:
        if self.stem_stride is not None:
            return self.stem_stride
        return 1 if self.input_size <= 64 else 2

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


RECIPES: dict[str, dict[str, Any]] = {
    # The default: a 2-core CPU builds it in about five minutes. Eight epochs leave the network
    # still underfitting, so it gets only flips: random crops cost 1.4 points of test accuracy
    # at this budget (90.6% against 92%, see docs/building.md).
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
    """Recipe defaults, then a JSON config file, then explicit overrides (``None`` = not given).

    Raises ValueError naming every bad or unknown setting.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values: dict[str, Any] = {"recipe": recipe, **RECIPES[recipe]}
    fields = set(BuildConfig.model_fields)
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
    try:
        return BuildConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ValueError(problems) from None
