"""Structured channel pruning of a trained MobileNetV1 with Torch-Pruning's dependency graph.

Pruning removes whole output channels, physically: the pruned network has narrower Conv and BN
layers, so the ONNX export is smaller and ONNX Runtime runs fewer mult-adds. (A mask, as
``torch.nn.utils.prune`` applies, changes nothing that ORT runs.) Torch-Pruning traces the
network once and prunes every coupled layer together: removing output channel ``c`` of a
pointwise conv also removes channel ``c`` of its BN, of the next block's depthwise conv (whose
``groups`` shrinks with it) and of that block's pointwise input.

Every layer but the classifier loses the same share of its output channels, ranked by the L2
norm of each channel's coupled weights; :attr:`MobileNetV1.widths` then reads the new channel
counts, which the checkpoint and the ONNX metadata carry so the network can be rebuilt.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from model.network import MobileNetV1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    net: MobileNetV1
    ratio: float
    widths_before: list[int]
    widths_after: list[int]
    params_before: int
    params_after: int


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"prune ratio must be in (0, 1), got {ratio}")


def prune_channels(
    net: MobileNetV1, ratio: float, input_size: int, *, round_to: int | None = None
) -> PruneResult:
    """A copy of ``net`` with ``ratio`` of every layer's output channels removed.

    ``round_to`` keeps each pruned width a multiple of that number (SIMD-friendly channel
    counts); ``None`` prunes exactly ``ratio``, rounded down per layer by Torch-Pruning.
    The caller's network is left as it was.
    """
    import torch_pruning as tp

    check_ratio(ratio)
    if not isinstance(net, MobileNetV1):
        raise TypeError(f"only MobileNetV1 can be pruned here, got {type(net).__name__}")
    pruned = copy.deepcopy(net).cpu().eval()
    # Tracing on a contiguous float32 example: the dependency graph only needs the shapes.
    example = torch.zeros(1, pruned.features[0][0].in_channels, input_size, input_size)
    before, params_before = pruned.widths, _params(pruned)
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        # The classifier's outputs are the classes: never prune them.
        ignored_layers=[pruned.classifier],
        round_to=round_to,
    )
    pruner.step()
    after = pruned.widths
    with torch.no_grad():
        out = pruned(example)
    if out.shape != (1, pruned.classifier.out_features):
        raise RuntimeError(f"pruning broke the network: output shape {tuple(out.shape)}")
    result = PruneResult(pruned, ratio, before, after, params_before, _params(pruned))
    log.info(
        "pruned %.0f%% of channels: widths %s -> %s, params %d -> %d",
        100 * ratio,
        before,
        after,
        params_before,
        result.params_after,
    )
    return result


def fine_tune_settings(config) -> dict:
    """The training settings after pruning: ``prune_epochs`` at a tenth of the peak learning
    rate (or ``prune_lr``), cosine-annealed without warm-up, since the weights are already
    trained and only have to recover what the removed channels did."""
    return {
        "epochs": config.prune_epochs,
        "lr": config.prune_lr if config.prune_lr is not None else config.lr / 10,
        "schedule": "cosine",
        "warmup_epochs": 0.0,
    }
