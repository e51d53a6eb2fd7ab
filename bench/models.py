"""The models the sweep measures, and the images it sends them.

Speed does not depend on the weights, so when the trained default model is absent an untrained
export of the same configuration stands in for it (and the report says so).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sepconv.spec import ModelSpec, read_spec

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("artifacts/model.onnx")
INT8_MODEL = Path("artifacts/model.int8.onnx")  # what `python -m model build --int8` writes
#: Where untrained stand-ins are cached between runs (git-ignored).
CACHE_DIR = Path("artifacts/bench")


@dataclass(frozen=True)
class BenchModel:
    key: str  # short name used in file names and tables
    title: str
    path: Path
    spec: ModelSpec
    trained: bool


def _export(path: Path, spec: ModelSpec) -> None:
    import torch

    from model.export import export_onnx
    from model.network import MobileNetV1

    torch.manual_seed(0)
    net = MobileNetV1(
        num_classes=spec.num_classes,
        in_channels=spec.channels,
        alpha=spec.alpha,
        stem_stride=spec.stem_stride,
    )
    export_onnx(net, spec, path)


def _export_untrained(path: Path, spec: ModelSpec) -> Path:
    """Export in a child process: torch's thread pool must not share the cores with the run."""
    log.info("exporting untrained %s to %s", spec.name, path)
    child = multiprocessing.get_context("spawn").Process(target=_export, args=(path, spec))
    child.start()
    child.join()
    if child.exitcode != 0 or not path.is_file():
        raise RuntimeError(f"exporting {path} failed (exit code {child.exitcode})")
    return path


def default_model(path: Path = DEFAULT_MODEL, cache_dir: Path = CACHE_DIR) -> BenchModel:
    """The served default (``artifacts/model.onnx``), else an untrained export of its shape."""
    if path.is_file():
        spec = read_spec(str(path))
        return BenchModel("default", f"default model ({_describe(spec)})", path, spec, True)
    from model.data import FASHION_MNIST_LABELS
    from model.recipes import resolve

    quick = resolve("quick")  # the stand-in follows the default recipe, never a copy of it
    cached = cache_dir / f"default-untrained-a{quick.alpha:g}-{quick.input_size}.onnx"
    spec = ModelSpec(
        name="mobilenet_v1-fashion-mnist-untrained",
        labels=FASHION_MNIST_LABELS,
        input_size=quick.input_size,
        color_mode="L",
        mean=[0.2860],  # Fashion-MNIST training-set statistics; speed does not depend on them
        std=[0.3530],
        alpha=quick.alpha,
        stem_stride=quick.resolved_stem_stride(),
    )
    if not cached.is_file():
        _export_untrained(cached, spec)
    spec = read_spec(str(cached))
    title = f"default config, untrained ({_describe(spec)}; {path} absent)"
    return BenchModel("default", title, cached, spec, False)


def int8_model(path: Path = INT8_MODEL, cache_dir: Path = CACHE_DIR) -> BenchModel:
    """``artifacts/model.int8.onnx``, else the default model quantized here for speed only.

    The stand-in is calibrated on random standardised inputs: its speed is that of a real
    INT8 build (same graph, same kernels), its answers are not.
    """
    if path.is_file():
        spec = read_spec(str(path))
        return BenchModel("int8", f"INT8 model ({_describe(spec)})", path, spec, True)
    from model.quantize import quantize_int8

    fp32 = default_model(cache_dir=cache_dir)
    cached = cache_dir / (fp32.path.stem + ".int8-speed-only.onnx")
    if not cached.is_file():
        log.info("quantizing %s to %s (random calibration, speed only)", fp32.path, cached)
        quantize_int8(fp32.path, normalized_batch(fp32.spec, 32), cached)
    spec = read_spec(str(cached))
    title = f"INT8 of the default model, calibrated on noise ({_describe(spec)}; {path} absent)"
    return BenchModel("int8", title, cached, spec, False)


def imagenet_shape_model(cache_dir: Path = CACHE_DIR) -> BenchModel:
    """Untrained MobileNetV1 alpha=1 at 224x224 RGB with 1000 classes: the paper's model."""
    cached = cache_dir / "mobilenet_v1-224-a1.onnx"
    if not cached.is_file():
        spec = ModelSpec(
            name="mobilenet_v1-224-untrained",
            labels=[f"class_{i}" for i in range(1000)],
            input_size=224,
            color_mode="RGB",
            mean=[0.485, 0.456, 0.406],
            std=[0.229, 0.224, 0.225],
            alpha=1.0,
            stem_stride=2,
        )
        _export_untrained(cached, spec)
    spec = read_spec(str(cached))
    return BenchModel(
        "224", f"224x224 alpha=1, 1000 classes ({_describe(spec)})", cached, spec, False
    )


def custom_model(path: Path) -> BenchModel:
    spec = read_spec(str(path))
    return BenchModel(path.stem.replace(".", "-"), f"{path} ({_describe(spec)})", path, spec, True)


def _describe(spec: ModelSpec) -> str:
    return (
        f"{spec.input_size}px {spec.color_mode}, alpha {spec.alpha:g}, "
        f"{spec.num_classes} classes, {spec.precision}"
    )


def image_format(spec: ModelSpec) -> tuple[str, str]:
    """(Pillow format, media type) a client would send: PNG for greyscale, JPEG for photos.

    Decoding is part of every request's cost: a 224 px RGB PNG takes about 1.5 ms to inflate
    on this CPU, the same image as a JPEG about 0.35 ms, and photo clients send JPEG.
    """
    return ("PNG", "image/png") if spec.color_mode == "L" else ("JPEG", "image/jpeg")


def sample_images(spec: ModelSpec, count: int = 64, seed: int = 0) -> list[bytes]:
    """Distinct images at the model's input size: smooth random shapes, not white noise.

    White noise is the worst case for any codec (incompressible); upsampled low-res noise
    compresses and decodes like a real photo-like image of that size.
    """
    rng = np.random.default_rng(seed)
    size = spec.input_size
    mode = spec.color_mode
    channels = spec.channels
    fmt, _ = image_format(spec)
    low = max(2, size // 4)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (low, low, channels), dtype=np.uint8)
        img = Image.fromarray(small[:, :, 0] if channels == 1 else small, mode)
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def normalized_batch(spec: ModelSpec, batch: int, seed: int = 0) -> np.ndarray:
    """A float32 (N, C, H, W) input as the service would build it (values do not affect speed)."""
    rng = np.random.default_rng(seed)
    shape = (batch, spec.channels, spec.input_size, spec.input_size)
    return rng.standard_normal(shape, dtype=np.float32)
