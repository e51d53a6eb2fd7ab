"""Encoded images -> the model's input tensor, on the event loop or on the decoding threads.

Preprocessing is :mod:`sepconv.preprocess` and nothing else, so serving sees exactly what training
saw. A small image decodes in less time than a thread hop adds to a request, so a request whose
images are small in all is decoded on the event loop. Larger ones go to a :class:`DecodePool`,
split into jobs of at least ``inline_max_pixels`` each: Pillow releases the GIL while it
decodes and resamples, so a request with several photos, or several photo requests at once,
keep every core busy.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from PIL import Image

from sepconv.hardware import available_cores
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

T = TypeVar("T")


def is_supported_image_type(media_type: str) -> bool:
    return media_type in SUPPORTED_IMAGE_TYPES


class DecodePool:
    """Threads that decode large images: as many as the cores, never more.

    Separate from asyncio's default executor (which sizes itself to cores + 4 and is shared
    with anything else that calls ``to_thread``): decoding is pure CPU work, so threads past
    the core count only slice the same cores finer and let every queued photo finish late.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or available_cores()
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="sepconv-decode")

    def submit(self, fn: Callable[..., T], *args) -> asyncio.Future[T]:
        """``fn(*args)`` on a decoding thread; cancelling the future drops a job not yet begun."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Stop the threads once the jobs they are running end; queued jobs are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)


_shared_pool: DecodePool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> DecodePool:
    """The process's decode pool, made on first use (in the worker process, not a parent)."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None:
            _shared_pool = DecodePool()
        return _shared_pool


def _forget_shared_pool() -> None:
    global _shared_pool
    _shared_pool = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_pool)


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


def _prepare_range(
    images: Sequence[Image.Image],
    lo: int,
    hi: int,
    spec: Preprocessing,
    names: Sequence[str],
    out: np.ndarray | None = None,
    normalized: bool = True,
) -> tuple[np.ndarray, list[float]]:
    """images[lo:hi] -> float32 (hi - lo, C, H, W) (``normalized``) or their uint8 pixels
    (hi - lo, H, W, C), written into ``out`` when given, and the seconds each image took (its
    share of the normalisation included)."""
    prepared = []
    timings = []
    for i in range(lo, hi):
        start = time.perf_counter()
        try:
            prepared.append(prepare(load(images[i], spec), spec))
        except ImageError as exc:
            raise _named(exc, i, len(images), names) from exc
        timings.append(time.perf_counter() - start)
    if not normalized:
        if out is None:
            return np.stack(prepared), timings
        out[...] = prepared
        return out, timings
    start = time.perf_counter()
    # One vectorised normalisation for the range instead of one per image.
    pixels = prepared[0][None] if len(prepared) == 1 else np.stack(prepared)
    batch = normalize(pixels, spec, out=out)
    share = (time.perf_counter() - start) / len(prepared)
    return batch, [t + share for t in timings]


def _report(observer: EngineObserver, timings: Sequence[float], opened_s: float) -> None:
    share = opened_s / len(timings)
    for t in timings:
        observer.preprocessed(t + share)


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
    batch, timings = _prepare_range(images, 0, len(images), spec, names)
    _report(observer, timings, opened_s)
    return batch


def split_jobs(pixels: Sequence[int], min_pixels: int) -> list[tuple[int, int]]:
    """Consecutive (lo, hi) ranges of images, each closed once it holds more than
    ``min_pixels``: a large image is a job of its own, and small ones share a job, so every
    thread hop buys at least ``min_pixels`` of decoding."""
    jobs = []
    lo = total = 0
    for i, count in enumerate(pixels):
        total += count
        if total > min_pixels:
            jobs.append((lo, i + 1))
            lo, total = i + 1, 0
    if lo < len(pixels):
        jobs.append((lo, len(pixels)))
    return jobs


async def preprocess_images_async(
    blobs: Sequence[bytes],
    spec: Preprocessing,
    *,
    max_pixels: int,
    inline_max_pixels: int,
    names: Sequence[str] = (),
    observer: EngineObserver = NULL_OBSERVER,
    pool: DecodePool | None = None,
    normalized: bool = True,
) -> np.ndarray:
    """:func:`preprocess_images`, on the decoding threads when the images are large; with
    ``normalized`` False, the uint8 pixels (N, H, W, C) that :func:`normalize` turns into the
    model's input (a quarter of the memory while they wait for a batch).

    The headers are read on the event loop (microseconds); the pixel count they declare is
    what decoding will cost, whatever the byte size: a 40 kB PNG can hold 16 megapixels.
    Up to ``inline_max_pixels`` in all, the request is decoded on the loop; above, its images
    are split into jobs (:func:`split_jobs`) that run on ``pool`` (default: the process's
    :func:`shared_pool`) at once, each writing its rows of the batch in request order.
    """
    images, opened_s = _open_all(blobs, max_pixels=max_pixels, names=names)
    pixels = [img.width * img.height for img in images]
    if sum(pixels) <= inline_max_pixels:
        batch, timings = _prepare_range(images, 0, len(images), spec, names, None, normalized)
        _report(observer, timings, opened_s)
        return batch
    pool = pool or shared_pool()
    jobs = split_jobs(pixels, inline_max_pixels)
    if len(jobs) == 1:
        batch, timings = await pool.submit(
            _prepare_range, images, 0, len(images), spec, names, None, normalized
        )
        _report(observer, timings, opened_s)
        return batch
    size, channels = spec.input_size, spec.channels
    if normalized:
        batch = np.empty((len(images), channels, size, size), np.float32)
    else:
        batch = np.empty((len(images), size, size, channels), np.uint8)
    futures = [
        pool.submit(_prepare_range, images, lo, hi, spec, names, batch[lo:hi], normalized)
        for lo, hi in jobs
    ]
    try:
        results = await asyncio.gather(*futures)
    except BaseException:
        # A bad image, or the request itself cancelled: jobs not yet begun never run.
        for future in futures:
            future.cancel()
        raise
    _report(observer, [t for _, timings in results for t in timings], opened_s)
    return batch
