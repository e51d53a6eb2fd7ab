"""MobileNetV1 (Howard et al. 2017, Table 1) with width multiplier alpha and any input size.

The body is a table of (out_channels, stride) pairs walked by one loop; a depthwise conv is the
same Conv-BN-ReLU helper with ``groups=channels``. ``conv="standard"`` replaces every separable
pair with one full 3x3 conv of the same stride and output channels (the paper's Table 4
baseline), and ``widths`` gives every layer's channel count explicitly, which is how a network
with structurally pruned channels is rebuilt from its checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

ConvType = Literal["separable", "standard"]
CONV_TYPES: tuple[str, ...] = ("separable", "standard")

#: Table 1 of the paper after the first conv: 13 depthwise-separable blocks.
#: The paper prints "Conv dw / s2" for the last block although its input is already 7x7; every
#: reference implementation (and the paper's own mult-add count) uses stride 1 there.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
STEM_CHANNELS = 32


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% of ``value``.

    The one rounding rule for the width multiplier (torchvision's ``_make_divisible``).
    """
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scaled_channels(channels: int, alpha: float) -> int:
    """Apply the width multiplier: the only place alpha touches a channel count."""
    return make_divisible(channels * alpha)


def layer_widths(alpha: float) -> list[int]:
    """Output channels of the stem and of each of the 13 blocks at width multiplier ``alpha``."""
    return [scaled_channels(c, alpha) for c in (STEM_CHANNELS, *(out for out, _ in BLOCKS))]


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__(
            ConvBNReLU(in_ch, in_ch, 3, stride, groups=in_ch),
            ConvBNReLU(in_ch, out_ch, 1, 1),
        )


class MobileNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        alpha: float = 1.0,
        stem_stride: int = 2,
        dropout: float = 0.0,
        conv: ConvType = "separable",
        widths: Sequence[int] | None = None,
    ):
        super().__init__()
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if conv not in CONV_TYPES:
            raise ValueError(f"conv must be one of {', '.join(CONV_TYPES)}, got {conv!r}")
        if widths is not None and (
            len(widths) != len(BLOCKS) + 1 or any(int(w) < 1 for w in widths)
        ):
            raise ValueError(
                f"widths needs {len(BLOCKS) + 1} positive channel counts (stem + 13 blocks), "
                f"got {list(widths)}"
            )
        self.alpha = alpha
        self.stem_stride = stem_stride
        self.conv = conv
        self._args = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "alpha": alpha,
            "stem_stride": stem_stride,
            "dropout": dropout,
        }
        planned = [int(w) for w in widths] if widths is not None else layer_widths(alpha)
        channels = planned[0]
        layers: list[nn.Module] = [ConvBNReLU(in_channels, channels, 3, stem_stride)]
        for out, (_, stride) in zip(planned[1:], BLOCKS, strict=True):
            if conv == "standard":
                layers.append(ConvBNReLU(channels, out, 3, stride))
            else:
                layers.append(DepthwiseSeparable(channels, out, stride))
            channels = out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)
        self.out_channels = channels
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Depthwise convs see fan_out / groups connections (timm's rule).
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def widths(self) -> list[int]:
        """Output channels of the stem and of each block, read from the layers themselves.

        After structural pruning these differ from ``layer_widths(alpha)``.
        """
        return [_out_channels(layer) for layer in self.features]

    def constructor_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this exact architecture (pruned widths included).

        The default architecture stays as before (no ``conv``/``widths`` keys), so checkpoints
        of plain networks read the same as they always did.
        """
        args = dict(self._args)
        if self.conv != "separable":
            args["conv"] = self.conv
        if self.widths != layer_widths(self.alpha):
            args["widths"] = self.widths
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # adaptive pool + flatten(x, 1) keep the batch axis free for a dynamic ONNX export
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def _out_channels(layer: nn.Module) -> int:
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels
