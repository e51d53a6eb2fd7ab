"""Encoded images -> the model's input tensor, on the event loop or in a thread.

Preprocessing is :mod:`sepconv.preprocess` and nothing else, so serving sees exactly what training
saw. Decoding is CPU work that holds the GIL only partly; a small image decodes in less time than
a thread hop adds to a request, so only images with many pixels go to a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from sepconv.preprocess import ImageError, Preprocessing, load, normalize, open_image, prepare
from service.engine.observer import NULL_OBSERVER, EngineObserver

Image.init()
#: Declared image types Pillow can decode (plus common aliases); anything else is a 415.
SUPPORTED_IMAGE_TYPES = frozenset(Image.MIME.values()) | {
    "image/jpg",
    "image/pjpeg",
    "image/x-png",
    "image/x-ms-bmp",
}


def is_supported_image_type(media_type: str) -> bool:
    return media_type in SUPPORTED_IMAGE_TYPES


def _named(exc: ImageError, index: int, count: int, names: Sequence[str]) -> ImageError:
    """In a multi-image request the error says which image it is about."""
    if count == 1:
        return exc
    name = names[index] if index < len(names) and names[index] else f"#{index + 1}"
    return type(exc)(f"image {name}: {exc}")


def _open_all(
    blobs: Sequence[bytes], *, max_pixels: int, names: Sequence[str]
) -> tuple[list[Image.Image], float]:
    """Every image's header parsed and checked; (images, seconds it took)."""
    start = time.perf_counter()
    images = []
    for i, blob in enumerate(blobs):
        try:
            images.append(open_image(blob, max_pixels=max_pixels))
        except ImageError as exc:
            raise _named(exc, i, len(blobs), names) from exc
    return images, time.perf_counter() - start


def _finish(
    images: Sequence[Image.Image],
    spec: Preprocessing,
    names: Sequence[str],
    opened_s: float,
    observer: EngineObserver,
) -> np.ndarray:
    """Opened images -> float32 (N, C, H, W): decompress, resize, normalise, time each."""
    prepared = []
    timings = []
    for i, img in enumerate(images):
        start = time.perf_counter()
        try:
            prepared.append(prepare(load(img), spec))
        except ImageError as exc:
            raise _named(exc, i, len(images), names) from exc
        timings.append(time.perf_counter() - start)
    start = time.perf_counter()
    # One vectorised normalisation for the whole request instead of one per image.
    pixels = prepared[0][None] if len(prepared) == 1 else np.stack(prepared)
    batch = normalize(pixels, spec)
    share = (time.perf_counter() - start + opened_s) / len(images)
    for t in timings:
        observer.preprocessed(t + share)
    return batch


def preprocess_images(
    blobs: Sequence[bytes],
    spec: Preprocessing,
    *,
    max_pixels: int,
    names: Sequence[str] = (),
    observer: EngineObserver = NULL_OBSERVER,
) -> np.ndarray:
    """Encoded images -> float32 (N, C, H, W). Raises ImageError naming the bad image."""
    images, opened_s = _open_all(blobs, max_pixels=max_pixels, names=names)
    return _finish(images, spec, names, opened_s, observer)


async def preprocess_images_async(
    blobs: Sequence[bytes],
    spec: Preprocessing,
    *,
    max_pixels: int,
    inline_max_pixels: int,
    names: Sequence[str] = (),
    observer: EngineObserver = NULL_OBSERVER,
) -> np.ndarray:
    """:func:`preprocess_images`, decoding in a thread only when the images are large.

    The headers are read on the event loop (microseconds); the pixel count they declare is
    what decoding will cost, whatever the byte size: a 40 kB PNG can hold 16 megapixels.
    """
    images, opened_s = _open_all(blobs, max_pixels=max_pixels, names=names)
    if sum(img.width * img.height for img in images) <= inline_max_pixels:
        return _finish(images, spec, names, opened_s, observer)
    return await asyncio.to_thread(_finish, images, spec, names, opened_s, observer)
