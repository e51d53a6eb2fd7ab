"""Request-side glue shared by the HTTP routes: image bytes -> tensors -> batcher -> probabilities.

Preprocessing is :mod:`service.preprocess` and nothing else, so serving sees exactly what training
saw. Decoding is CPU work that holds the GIL only partly; a small image decodes faster than a
thread hop costs, so only large payloads go to a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from service.batcher import Batcher
from service.metrics import PREPROCESS_DURATION
from service.postprocess import softmax
from service.preprocess import ImageError, decode, normalize, prepare
from service.spec import ModelSpec

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


def preprocess_images(
    blobs: Sequence[bytes], spec: ModelSpec, *, max_pixels: int, names: Sequence[str] = ()
) -> np.ndarray:
    """Encoded images -> float32 (N, C, H, W). Raises ImageError naming the bad image."""
    prepared = []
    timings = []
    for i, blob in enumerate(blobs):
        start = time.perf_counter()
        try:
            prepared.append(prepare(decode(blob, max_pixels=max_pixels), spec))
        except ImageError as exc:
            if len(blobs) == 1:
                raise
            name = names[i] if i < len(names) and names[i] else f"#{i + 1}"
            raise type(exc)(f"image {name}: {exc}") from exc
        timings.append(time.perf_counter() - start)
    start = time.perf_counter()
    # One vectorised normalisation for the whole request instead of one per image.
    pixels = prepared[0][None] if len(prepared) == 1 else np.stack(prepared)
    batch = normalize(pixels, spec)
    share = (time.perf_counter() - start) / len(blobs)
    for t in timings:
        PREPROCESS_DURATION.observe(t + share)
    return batch


async def preprocess_images_async(
    blobs: Sequence[bytes],
    spec: ModelSpec,
    *,
    max_pixels: int,
    inline_max_bytes: int,
    names: Sequence[str] = (),
) -> np.ndarray:
    if sum(len(b) for b in blobs) <= inline_max_bytes:
        return preprocess_images(blobs, spec, max_pixels=max_pixels, names=names)
    return await asyncio.to_thread(
        preprocess_images, blobs, spec, max_pixels=max_pixels, names=names
    )


async def infer_probabilities(batcher: Batcher, batch: np.ndarray) -> np.ndarray:
    """float32 (N, C, H, W) -> probabilities (N, num_classes), each image through the batcher."""
    if len(batch) == 1:
        logits = (await batcher.submit(batch[0]))[None]
    else:
        logits = np.stack(await asyncio.gather(*(batcher.submit(x) for x in batch)))
    return softmax(logits)
