"""Evaluation: accuracy of a PyTorch network, or of an ONNX Runtime session, on a data split.

Both paths normalise with :func:`sepconv.preprocess.normalize`, the function the service uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model.data import Split, iter_batches, progress
from sepconv import preprocess
from sepconv.preprocess import Preprocessing


def to_input(
    images: np.ndarray,
    pixels: Preprocessing,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W) on ``device``."""
    x = torch.from_numpy(preprocess.normalize(images, pixels)).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(
    net: nn.Module,
    split: Split,
    pixels: Preprocessing,
    *,
    device: torch.device,
    batch_size: int = 500,
    channels_last: bool = False,
    desc: str = "eval",
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``split``; leaves ``net`` in the mode it found it."""
    was_training = net.training
    net.eval()
    loss_sum, correct = 0.0, 0
    try:
        for idx in progress(iter_batches(len(split), batch_size), desc=desc, unit="batch"):
            x = to_input(split.images[idx], pixels, device, channels_last)
            y = torch.from_numpy(split.labels[idx]).to(device)
            # fp32 even on a GPU: this figure picks the best epoch and is checked against ORT's.
            logits = net(x).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    finally:
        net.train(was_training)
    return loss_sum / len(split), correct / len(split)


def onnx_accuracy(
    session,
    split: Split,
    pixels: Preprocessing,
    *,
    batch_size: int = 500,
    desc: str = "onnxruntime",
) -> float:
    """Accuracy of an ``onnxruntime.InferenceSession`` on ``split``, in batches."""
    input_name = session.get_inputs()[0].name
    correct = 0
    for idx in progress(iter_batches(len(split), batch_size), desc=desc, unit="batch"):
        (logits,) = session.run(None, {input_name: preprocess.normalize(split.images[idx], pixels)})
        correct += int((logits.argmax(1) == split.labels[idx]).sum())
    return correct / len(split)
