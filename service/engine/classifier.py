"""The one inference seam: every protocol (``/v1``, OIP REST, gRPC) classifies through here.

Encoded images or preprocessed tensors go in; probabilities come out, and top-k from them. The
rules that must not differ between protocols live here once: the same decoding, every image
through the shared batcher (so requests of all protocols batch together), cancel the rest of a
request when one of its images fails, softmax, and image errors turned into service errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from sepconv.preprocess import ImageError, ImageTooLargeError
from sepconv.spec import ModelSpec
from service.engine import decode
from service.engine.batcher import Batcher
from service.engine.context import RequestContext
from service.engine.observer import NULL_OBSERVER, EngineObserver
from service.engine.postprocess import softmax, top_k_indices
from service.engine.runtime import ModelRuntime
from service.errors import ImageTooLarge, InvalidImage


class Classifier:
    """A loaded model behind its batcher; ``await classify_*`` from any protocol."""

    def __init__(
        self,
        runtime: ModelRuntime,
        batcher: Batcher,
        *,
        max_pixels: int,
        inline_decode_max_pixels: int,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.max_pixels = max_pixels
        self.inline_decode_max_pixels = inline_decode_max_pixels
        self.observer = observer

    @property
    def spec(self) -> ModelSpec:
        return self.runtime.spec

    @property
    def max_rows(self) -> int:
        """Most images one request may hold: more could never be queued at once."""
        return self.batcher.max_queue_size

    async def preprocess(self, blobs: Sequence[bytes], names: Sequence[str] = ()) -> np.ndarray:
        """Encoded images -> float32 (N, C, H, W), exactly as in training."""
        try:
            return await decode.preprocess_images_async(
                blobs,
                self.spec,
                max_pixels=self.max_pixels,
                inline_max_pixels=self.inline_decode_max_pixels,
                names=names,
                observer=self.observer,
            )
        except ImageTooLargeError as exc:
            raise ImageTooLarge(str(exc)) from exc
        except ImageError as exc:
            raise InvalidImage(str(exc)) from exc

    async def classify_images(
        self,
        blobs: Sequence[bytes],
        names: Sequence[str] = (),
        ctx: RequestContext | None = None,
    ) -> np.ndarray:
        """Encoded images -> probabilities (N, num_classes), in request order."""
        batch = await self.preprocess(blobs, names)
        return await self.classify_tensor(batch, ctx)

    async def classify_tensor(
        self, batch: np.ndarray, ctx: RequestContext | None = None
    ) -> np.ndarray:
        """float32 (N, C, H, W) -> probabilities (N, num_classes), each row through the batcher."""
        return softmax(np.stack(await self._submit_all(batch, ctx)))

    async def _submit_all(self, batch: np.ndarray, ctx: RequestContext | None) -> list[np.ndarray]:
        """Every row to the shared batcher; if one fails, the others are cancelled: the batcher
        drops cancelled rows instead of spending model time on an answer nobody will read."""
        if len(batch) == 1:
            return [await self.batcher.submit(batch[0], ctx)]
        tasks = [asyncio.ensure_future(self.batcher.submit(row, ctx)) for row in batch]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def top_k(self, probs: np.ndarray, k: int) -> np.ndarray:
        """(N, min(k, classes)) class indices per row, best first, ties in index order."""
        return top_k_indices(probs, k)
