"""Image bytes to model input: the single preprocessing implementation.

Training (``model.data``) and serving both call these functions, so a served image goes through
exactly the resize, colour conversion and normalisation the network was trained with. The
parameters are a :class:`Preprocessing`, which :class:`sepconv.spec.ModelSpec` extends: they are
described here once and travel in the model file's metadata.

Stages, each a function so the service can time them separately:
``decode`` (bytes -> upright PIL image; ``open_image`` + ``load``, so the header can be
checked before the pixels are paid for) -> ``prepare`` (colour mode + resize -> uint8 HxWxC)
-> ``normalize`` (uint8 -> float32 CxHxW, batched or not).

Photos are reduced on the way in, never below :data:`REDUCE_FLOOR` times the input size: a
JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling, and the final resample of
any format first box-reduces by an integer factor (``reducing_gap``). An image whose shorter
side is under 4x the input size goes through neither and is decoded exactly as a full decode
would be.

JPEGs are decoded by simplejpeg (:mod:`sepconv.jpeg`) when it is installed, by Pillow otherwise
and for whatever simplejpeg cannot do (CMYK, files libjpeg warns about, other formats). Both
run libjpeg-turbo with the same scale and output colour space, so the pixels are the same
whichever decodes: the choice is speed only, not part of :class:`Preprocessing`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sepconv import jpeg

ColorMode = Literal["L", "RGB"]
#: ``center-crop``: scale the shorter side to ``input_size`` then crop the centre square.
#: ``stretch``: scale both sides to ``input_size`` (aspect ratio not kept).
ResizePolicy = Literal["center-crop", "stretch"]
Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]
#: How a colour JPEG becomes grey for an L model. ``y-plane``: the decoder outputs the JPEG's
#: own luma plane (the encoder's 0.299 R + 0.587 G + 0.114 B before chroma subsampling), and
#: skips the colour planes' IDCT, upsampling and conversion. ``rgb``: decode colour, then Pillow's
#: ITU-R 601-2 luma of the decoded RGB, as models built before this option were trained (a
#: model file without the key reads as ``rgb``, see :mod:`sepconv.spec`). On photos the two
#: differ on a few pixels in ten thousand, by 1-3 grey levels; on saturated colours by up to ~30.
#: Other formats always go through RGB.
JpegGray = Literal["y-plane", "rgb"]
#: Which library decodes a JPEG: simplejpeg (libjpeg-turbo's TurboJPEG API) or Pillow. The
#: pixels are the same (see the module docstring); simplejpeg is faster.
Decoder = Literal["simplejpeg", "pillow"]
#: The decoder :func:`load` uses unless told otherwise: simplejpeg when installed.
JPEG_DECODER: Decoder = "simplejpeg" if jpeg.available() else "pillow"

#: Large images are reduced cheaply (JPEG DCT scaling, integer box reduction) to no less than
#: this many times the input size; the resampling filter does the rest. At 2 the result stays
#: within a fraction of a grey level of a full-size decode (tests/test_photo.py bounds it),
#: while a 4000x3000 JPEG for a 224 px model decodes at 1/4 scale in about half the time.
REDUCE_FLOOR = 2

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class Preprocessing(BaseModel):
    """How an image becomes the network's input: the one description, used by both sides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(
        gt=0, description="Square input side in pixels (resolution multiplier)."
    )
    color_mode: ColorMode
    mean: list[float]
    std: list[float]
    resize: ResizePolicy = "center-crop"
    resample: Resample = "bilinear"
    jpeg_gray: JpegGray = "y-plane"

    @model_validator(mode="after")
    def _check_channels(self) -> Preprocessing:
        channels = self.channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean/std need {channels} value(s) for colour mode {self.color_mode}, "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @classmethod
    def neutral(cls, input_size: int, color_mode: ColorMode, **kwargs) -> Preprocessing:
        """Mean 0 and std 1 (no standardisation): for resizing before the statistics exist."""
        channels = 1 if color_mode == "L" else 3
        return cls(
            input_size=input_size,
            color_mode=color_mode,
            mean=[0.0] * channels,
            std=[1.0] * channels,
            **kwargs,
        )


class ImageError(ValueError):
    """The bytes are not an image we can use; the message is safe to show to the client."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured limit (decompression-bomb guard)."""


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse the header only: format and size are known, no pixel is decompressed yet.

    The pixel limit is checked here, so a decompression bomb is refused before any work, and
    the caller can weigh the decode cost (pixels) before paying it.
    """
    if not data:
        raise ImageError("empty image body")
    with _decode_errors(), warnings.catch_warnings():
        # Pillow's own bomb warning is replaced by our explicit limit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        return img


def load(img: Image.Image, spec: Preprocessing, *, decoder: Decoder | None = None) -> Image.Image:
    """Decompress an opened image, at reduced scale when it is far larger than the input
    (JPEG only, see :func:`draft`), and turn it upright.

    ``decoder`` (default :data:`JPEG_DECODER`) picks the JPEG decoder; the result is the same
    either way. An image simplejpeg cannot decode goes to Pillow.
    """
    if (decoder or JPEG_DECODER) == "simplejpeg":
        with _decode_errors():
            fast = jpeg.decode(img, gray=_jpeg_luma(spec), floor=REDUCE_FLOOR * spec.input_size)
        if fast is not None:
            return fast
    with _decode_errors():
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated formats: classify the first frame
        draft(img, spec)
        img.load()
        # Phone cameras store rotation in EXIF instead of rotating the pixels. In place: the
        # default copies every image, rotated or not.
        ImageOps.exif_transpose(img, in_place=True)
    return img


def _jpeg_luma(spec: Preprocessing) -> bool:
    """Whether a colour JPEG is decoded straight to its luma plane (see :data:`JpegGray`)."""
    return spec.color_mode == "L" and spec.jpeg_gray == "y-plane"


def draft(img: Image.Image, spec: Preprocessing) -> None:
    """Ask the JPEG decoder for the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at
    least ``REDUCE_FLOOR x input_size``, and for the luma plane alone when :func:`_jpeg_luma`;
    a no-op for other formats, and for the scale on smaller images.

    Both sides, because that is what centre-crop needs of the shorter side and stretch of
    each. The request is a square, so it holds whichever way EXIF later turns the image.
    """
    floor = REDUCE_FLOOR * spec.input_size
    mode = "L" if _jpeg_luma(spec) else None
    # Below twice the floor no scale reduces anything: leave the scale alone, so those
    # images decode bit for bit as they always did.
    if jpeg.dct_scale(*img.size, floor) > 1:
        img.draft(mode, (floor, floor))
    elif mode:
        img.draft(mode, None)


def decode(
    data: bytes, spec: Preprocessing, *, max_pixels: int, decoder: Decoder | None = None
) -> Image.Image:
    """Bytes to a loaded, upright image (:func:`open_image` then :func:`load`), reduced in
    decoding towards ``spec``'s input size where the format allows."""
    return load(open_image(data, max_pixels=max_pixels), spec, decoder=decoder)


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's many exception types -> one ImageError whose message the client may see."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("cannot identify image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated files raise OSError("image file is truncated ..."), broken headers SyntaxError.
        raise ImageError(f"cannot decode image: {exc}") from exc


def _to_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """Convert any Pillow mode to ``L`` or ``RGB`` without losing range or mixing in garbage."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: Pillow's convert("L") clips at 255 instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    elif mode == "CMYK":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        # Transparent pixels become black: the background Fashion-MNIST was drawn on.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    # convert() to the same mode still copies the pixels.
    return img if img.mode == color_mode else img.convert(color_mode)


def _centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square box ``ImageOps.fit(img, (n, n), centering=(0.5, 0.5))`` resamples,
    computed the same way (floats included), so the result is the same bit for bit."""
    w, h = float(width), float(height)
    if w / h == 1.0:
        crop_w, crop_h = w, h
    elif w / h >= 1.0:
        crop_w, crop_h = h, h
    else:
        crop_w, crop_h = w, w
    left = (w - crop_w) * 0.5
    top = (h - crop_h) * 0.5
    return (left, top, left + crop_w, top + crop_h)


def prepare(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Colour-convert and resize to the model's input: uint8 array of shape (H, W, C)."""
    img = _to_mode(img, spec.color_mode)
    size = (spec.input_size, spec.input_size)
    if img.size != size:
        if spec.resize == "center-crop":
            box = _centre_square(*img.size)
        elif spec.resize == "stretch":
            box = None
        else:
            raise ValueError(f"unknown resize policy {spec.resize!r}")
        # ImageOps.fit has no reducing_gap, hence the box above. With the gap, Pillow first
        # box-reduces by an integer factor that leaves at least REDUCE_FLOOR x the output per
        # axis, then filters the rest: much less work on a photo, identical below 4x.
        img = img.resize(size, _RESAMPLE[spec.resample], box=box, reducing_gap=REDUCE_FLOOR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _standardise(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: every uint8 value through the exact float32 formula, per channel."""
    values = np.arange(256, dtype=np.uint8)[:, None]
    table = _standardise(values, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    return np.ascontiguousarray(table.T)


def normalize(
    pixels: np.ndarray, spec: Preprocessing, *, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (..., H, W, C) -> float32 (..., C, H, W), scaled to [0, 1] then standardised.

    ``out`` (uint8 input only) receives the result in place: the service fills one request's
    batch from several decoding threads without a copy to join them.
    """
    if pixels.dtype != np.uint8:
        if out is not None:
            raise ValueError("out= needs uint8 pixels")
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        return np.ascontiguousarray(np.moveaxis(_standardise(pixels, mean, std), -1, -3))
    # uint8 has 256 values: a per-channel table lookup gives bit-identical results to the
    # formula in one pass instead of five (3.5x faster on a 224x224 RGB image).
    table = _lookup_table(tuple(spec.mean), tuple(spec.std))
    channels = pixels.shape[-1]
    shape = (*pixels.shape[:-3], channels, *pixels.shape[-3:-1])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    for c in range(channels):
        np.take(table[c], pixels[..., c], out=out[..., c, :, :], mode="clip")
    return out


def preprocess_bytes(data: bytes, spec: Preprocessing, *, max_pixels: int) -> np.ndarray:
    """All three stages for one image: bytes -> float32 (C, H, W)."""
    return normalize(prepare(decode(data, spec, max_pixels=max_pixels), spec), spec)
