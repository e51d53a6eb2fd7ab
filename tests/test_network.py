"""MobileNetV1 against the paper (Howard et al. 2017): Table 1's shapes and the parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.network import MobileNetV1, make_divisible, scaled_channels

# Table 1, written out row by row from the paper (not from model.network), for 1.0-224:
# (kind, input channels, output channels, stride, output side). The paper prints "s2" on the
# last depthwise row although its input is already 7x7; the output sizes it lists need s1.
TABLE_1 = [
    ("conv", 3, 32, 2, 112),
    ("dw", 32, 32, 1, 112), ("pw", 32, 64, 1, 112),
    ("dw", 64, 64, 2, 56), ("pw", 64, 128, 1, 56),
    ("dw", 128, 128, 1, 56), ("pw", 128, 128, 1, 56),
    ("dw", 128, 128, 2, 28), ("pw", 128, 256, 1, 28),
    ("dw", 256, 256, 1, 28), ("pw", 256, 256, 1, 28),
    ("dw", 256, 256, 2, 14), ("pw", 256, 512, 1, 14),
    *[row for _ in range(5) for row in (("dw", 512, 512, 1, 14), ("pw", 512, 512, 1, 14))],
    ("dw", 512, 512, 2, 7), ("pw", 512, 1024, 1, 7),
    ("dw", 1024, 1024, 1, 7), ("pw", 1024, 1024, 1, 7),
]  # fmt: skip


def table_1_parameters(num_classes: int = 1000) -> int:
    """Weights of every conv, BN scale and shift per output channel, then the FC layer."""
    total = 0
    for kind, cin, cout, _, _ in TABLE_1:
        weights = {"conv": 3 * 3 * cin * cout, "dw": 3 * 3 * cin, "pw": cin * cout}[kind]
        total += weights + 2 * cout
    return total + 1024 * num_classes + num_classes


def conv_outputs(net: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int, int, int]]:
    """(kind, in, out, stride, output side) of every conv, in forward order."""
    rows = []

    def hook(module, _inputs, output):
        kind = "conv" if not rows else "dw" if module.groups > 1 else "pw"
        rows.append((kind, module.in_channels, module.out_channels, module.stride[0],
                     output.shape[-1]))  # fmt: skip

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net.eval()(x)
    for h in handles:
        h.remove()
    return rows


def test_table_1_parameter_count_is_4_231_976():
    assert table_1_parameters() == 4_231_976
    net = MobileNetV1(num_classes=1000, in_channels=3, alpha=1.0, stem_stride=2)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 4_231_976


def test_every_layer_matches_table_1_at_224():
    net = MobileNetV1(num_classes=1000)
    assert conv_outputs(net, torch.zeros(1, 3, 224, 224)) == TABLE_1
    assert net(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


@pytest.mark.parametrize("alpha, millions", [(1.0, 4.2), (0.75, 2.6), (0.5, 1.3), (0.25, 0.5)])
def test_width_multiplier_parameters_match_table_6(alpha, millions):
    net = MobileNetV1(num_classes=1000, alpha=alpha)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == millions


def test_width_multiplier_scales_every_layer_through_one_rule():
    net = MobileNetV1(num_classes=10, alpha=0.5)
    rows = conv_outputs(net, torch.zeros(1, 3, 224, 224))
    expected = [scaled_channels(cout, 0.5) for _, _, cout, _, _ in TABLE_1]
    assert [r[2] for r in rows] == expected
    assert expected[0] == 16 and expected[-1] == 512
    # The rounding never drops more than 10% and always lands on a multiple of 8.
    for value in (3.2, 12, 20, 36, 100, 513):
        assert make_divisible(value) % 8 == 0 and make_divisible(value) >= 0.9 * value


def test_stem_stride_1_keeps_a_28_px_map_from_collapsing():
    net = MobileNetV1(num_classes=10, in_channels=1, alpha=0.25, stem_stride=1)
    sides = [r[4] for r in conv_outputs(net, torch.zeros(1, 1, 28, 28))]
    assert sides[0] == 28 and sides[-1] == 2
    stride2 = MobileNetV1(num_classes=10, in_channels=1, alpha=0.25, stem_stride=2)
    assert conv_outputs(stride2, torch.zeros(1, 1, 28, 28))[-1][4] == 1
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"in_channels": 2}, "in_channels"),
        ({"stem_stride": 3}, "stem_stride"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MobileNetV1(**kwargs)
