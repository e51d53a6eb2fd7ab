"""Shared fixtures: tiny exported MobileNetV1 models, built once per test session in seconds.

No test needs the trained default model, a GPU or the network.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_LABELS = ["circle", "square", "cross"]

# Tests start many servers, in this process and as subprocesses, side by side: each would bind
# gRPC's default port 8001. gRPC is off unless a test asks for it with a free port.
os.environ.setdefault("SEPCONV_GRPC_PORT", "0")


def _build(tmp: Path, *, color_mode: str, input_size: int, stem_stride: int, seed: int) -> Path:
    import torch

    from model.export import export_onnx
    from model.network import MobileNetV1
    from sepconv.spec import ModelSpec

    torch.manual_seed(seed)
    channels = 1 if color_mode == "L" else 3
    net = MobileNetV1(
        num_classes=len(TINY_LABELS), in_channels=channels, alpha=0.25, stem_stride=stem_stride
    )
    # A few train-mode forward passes give BN non-trivial running stats, so the export is not
    # an identity-BN special case.
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, channels, input_size, input_size))
    spec = ModelSpec(
        name=f"tiny-{color_mode.lower()}",
        version="test",
        labels=TINY_LABELS,
        input_size=input_size,
        color_mode=color_mode,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        alpha=0.25,
        stem_stride=stem_stride,
        recipe="untrained",
        test_accuracy=0.5,
    )
    return export_onnx(net, spec, tmp / "model.onnx")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """Greyscale, 28 px, stem stride 1, 3 classes: the shape of the Fashion-MNIST default."""
    return _build(
        tmp_path_factory.mktemp("tiny_l"), color_mode="L", input_size=28, stem_stride=1, seed=0
    )


@pytest.fixture(scope="session")
def tiny_rgb_model_path(tmp_path_factory) -> Path:
    """RGB, 32 px, stem stride 2, 3 classes."""
    return _build(
        tmp_path_factory.mktemp("tiny_rgb"), color_mode="RGB", input_size=32, stem_stride=2, seed=1
    )


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def make_png():
    """Factory: deterministic random image bytes, distinct per seed."""

    def _make(seed: int = 0, size: int = 28, mode: str = "L", fmt: str = "PNG") -> bytes:
        rng = np.random.default_rng(seed)
        shape = (size, size) if mode == "L" else (size, size, len(mode))
        return png_bytes(rng.integers(0, 256, shape, dtype=np.uint8), mode, fmt)

    return _make


class FailingBatcher:
    """Stands in for the classifier's batcher: every submit raises the given error."""

    max_queue_size = 512

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def runs_inline(self) -> bool:
        return False

    async def submit(self, x, ctx=None, *, alone=False):
        raise self.exc

    def enqueue(self, x, ctx=None, *, alone=False):
        raise self.exc
