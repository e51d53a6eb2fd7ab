"""Verification: does the exported ONNX model compute what the trained PyTorch network computes?

Two checks, after timm's ``onnx_validate``: the largest logit difference between ONNX Runtime
and PyTorch on a real batch, and the test accuracy measured again through ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.data import Split
from model.evaluate import onnx_accuracy
from sepconv import preprocess
from sepconv.preprocess import Preprocessing

#: The largest absolute logit difference accepted between ONNX Runtime and PyTorch.
TOLERANCE = 1e-4
#: Images in the comparison batch.
COMPARE_BATCH = 64
#: Accuracy may differ from PyTorch's by at most this much: float32 rounding flips at most a
#: handful of near-tie predictions, anything more means the graphs differ.
ACCURACY_SLACK = 0.002


class VerificationError(RuntimeError):
    """The exported model does not match the trained network."""


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    compared_on: str  # what the comparison batch was
    onnx_accuracy: float | None
    torch_accuracy: float | None
    tolerance: float = TOLERANCE

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.max_abs_diff <= self.tolerance:  # also catches NaN
            out.append(
                f"ONNX Runtime and PyTorch logits differ by up to {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:g})"
            )
        if (
            self.onnx_accuracy is not None
            and self.torch_accuracy is not None
            and abs(self.onnx_accuracy - self.torch_accuracy) > ACCURACY_SLACK
        ):
            out.append(
                f"test accuracy through ONNX Runtime is {self.onnx_accuracy:.4f}, "
                f"PyTorch measured {self.torch_accuracy:.4f}"
            )
        return out

    @property
    def ok(self) -> bool:
        return not self.problems


def ort_session(model: str | Path | bytes):
    """A CPU session on a file or serialized bytes: the reference every provider is compared
    against."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def comparison_batch(
    pixels: Preprocessing, test: Split | None, seed: int = 0
) -> tuple[np.ndarray, str]:
    """The first test images, normalised; random inputs only when there is no data at all."""
    if test is not None and len(test):
        n = min(COMPARE_BATCH, len(test))
        return preprocess.normalize(test.images[:n], pixels), f"{n} test images"
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, pixels.channels, pixels.input_size, pixels.input_size))
    return x.astype(np.float32), "8 random normal inputs (no data set)"


@torch.no_grad()
def max_logit_difference(net: nn.Module, session, x: np.ndarray) -> float:
    net = net.eval().cpu()
    expected = net(torch.from_numpy(x)).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    if got.shape != expected.shape:
        raise VerificationError(
            f"ONNX Runtime returned logits of shape {got.shape}, PyTorch {expected.shape}"
        )
    return float(np.max(np.abs(got.astype(np.float64) - expected)))


def verify(
    onnx_model: str | Path | bytes,
    net: nn.Module,
    pixels: Preprocessing,
    test: Split | None,
    *,
    torch_accuracy: float | None = None,
    batch_size: int = 500,
    tolerance: float = TOLERANCE,
) -> VerifyReport:
    """Compare ``onnx_model`` (a file or its bytes) with ``net``; re-measure accuracy through ORT
    when there is data."""
    session = ort_session(onnx_model)
    x, what = comparison_batch(pixels, test)
    diff = max_logit_difference(net, session, x)
    acc = None
    if test is not None and len(test):
        acc = onnx_accuracy(session, test, pixels, batch_size=batch_size)
    return VerifyReport(diff, what, acc, torch_accuracy, tolerance)
