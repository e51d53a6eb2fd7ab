"""The one inference seam: every protocol (``/v1``, OIP REST, gRPC) classifies through here.

Encoded images or preprocessed tensors go in; probabilities come out, and top-k from them. The
rules that must not differ between protocols live here once: admission before any decoding, the
same decoding, every image through the shared batcher (so requests of all protocols batch
together), cancel the rest of a request when one of its images fails, softmax, and image errors
turned into service errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import numpy as np

from sepconv.preprocess import ImageError, ImageTooLargeError
from sepconv.spec import ModelSpec
from service.engine import decode
from service.engine.admission import MAX_REFUSAL_HOLD_S, Admission
from service.engine.batcher import Batcher
from service.engine.context import RequestContext
from service.engine.observer import NULL_OBSERVER, EngineObserver
from service.engine.postprocess import softmax
from service.engine.runtime import ModelRuntime
from service.errors import ImageTooLarge, InvalidImage, Overloaded, PayloadTooLarge


class Inputs(Protocol):
    """What a protocol's request gives the engine: exactly one of encoded ``images`` and a
    preprocessed ``tensor`` (float32 N, C, H, W), and the images' ``names`` (may be empty)."""

    @property
    def images(self) -> Sequence[bytes] | None: ...

    @property
    def tensor(self) -> np.ndarray | None: ...

    @property
    def names(self) -> Sequence[str]: ...


class Classifier:
    """A loaded model behind its batcher; ``await classify_*`` from any protocol."""

    def __init__(
        self,
        runtime: ModelRuntime,
        batcher: Batcher,
        *,
        max_pixels: int,
        inline_decode_max_pixels: int,
        max_queue_delay_s: float = 1.0,
        refusal_rate_factor: float = 0.0,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.admission = Admission(
            batcher,
            max_delay_s=max_queue_delay_s,
            refusal_rate_factor=refusal_rate_factor,
            observer=observer,
        )
        self.active = 0  # requests between admission and their answer
        #: Images wait for their batch as uint8 pixels (the batcher normalises them).
        self.queues_pixels = getattr(batcher, "normalize", None) is not None
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

    async def admit(self, images: int = 1) -> None:
        """Refuse (:class:`~service.errors.Overloaded`, paced) what could not be served within
        the latency budget: routes call this before they read a body."""
        try:
            self.admission.check(images)
        except Overloaded as exc:
            await self.admission.pace(exc.retry_after_s or MAX_REFUSAL_HOLD_S)
            raise

    def close(self) -> None:
        """Release what the model holds beyond its batcher (call once the batcher has stopped):
        its share of the lanes' accounting and its ONNX Runtime session."""
        self.admission.close()
        self.runtime.close()

    def check_rows(self, rows: int) -> None:
        """More rows than the queue can ever hold at once: 413, since a retry cannot help."""
        if rows > self.max_rows:
            raise PayloadTooLarge(
                f"{rows} rows in one request; the server queues at most {self.max_rows} "
                "(SEPCONV_MAX_QUEUE_SIZE)",
                code="too_many_rows",
            )

    async def classify(self, inputs: Inputs, ctx: RequestContext | None = None) -> np.ndarray:
        """A protocol's decoded request -> probabilities (N, num_classes), in request order."""
        if inputs.images is not None:
            self.check_rows(len(inputs.images))
            return await self.classify_images(inputs.images, inputs.names, ctx)
        self.check_rows(len(inputs.tensor))
        return await self.classify_tensor(inputs.tensor, ctx)

    async def preprocess(self, blobs: Sequence[bytes], names: Sequence[str] = ()) -> np.ndarray:
        """Encoded images -> float32 (N, C, H, W), exactly as in training; or, when the
        batcher normalises on its own thread, their uint8 pixels (N, H, W, C)."""
        try:
            return await decode.preprocess_images_async(
                blobs,
                self.spec,
                max_pixels=self.max_pixels,
                inline_max_pixels=self.inline_decode_max_pixels,
                names=names,
                observer=self.observer,
                normalized=not self.queues_pixels,
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
        """Encoded images -> probabilities (N, num_classes), in request order.

        Admitted (or refused) before any pixel is decoded; while decoding, the images count as
        queued work for the admission of others.
        """
        async with self._request(ctx) as (ctx, started):
            with self.admission.reserve(len(blobs)):
                batch = await self.preprocess(blobs, names)
            ctx.decode_s = time.monotonic() - started
            # No await between the reservation's end and the enqueueing: never counted twice.
            return await self._probabilities(batch, ctx)

    async def classify_tensor(
        self, batch: np.ndarray, ctx: RequestContext | None = None
    ) -> np.ndarray:
        """float32 (N, C, H, W) -> probabilities (N, num_classes), each row through the batcher."""
        async with self._request(ctx) as (ctx, _):
            self.admission.check(len(batch))
            return await self._probabilities(batch, ctx)

    @contextlib.asynccontextmanager
    async def _request(
        self, ctx: RequestContext | None
    ) -> AsyncIterator[tuple[RequestContext, float]]:
        """One request in progress: counted while it runs (see ``alone``), and reported to the
        observer when it ends, refused or failed included; a refusal waits its turn."""
        ctx = ctx if ctx is not None else RequestContext()
        started = time.monotonic()
        refused: Overloaded | None = None
        self.active += 1
        lanes = self.admission.lanes
        lanes.enter()
        try:
            yield ctx, started
        except BaseException as exc:
            self.observer.request_finished(ctx, started, time.monotonic() - started, exc)
            if isinstance(exc, Overloaded):
                refused = exc
            raise
        else:
            self.observer.request_finished(ctx, started, time.monotonic() - started, None)
        finally:
            self.active -= 1
            lanes.leave()
            if refused is not None:
                # Held after it stops counting: a refusal waiting its turn is not work in
                # progress, and must not keep a lone request off the inline path.
                await self.admission.pace(refused.retry_after_s or MAX_REFUSAL_HOLD_S)

    async def _probabilities(self, batch: np.ndarray, ctx: RequestContext) -> np.ndarray:
        rows = await self._submit_all(batch, ctx)
        start = time.monotonic()
        probs = softmax(np.stack(rows))
        ctx.postprocess_s = time.monotonic() - start
        return probs

    async def _submit_all(self, batch: np.ndarray, ctx: RequestContext | None) -> list[np.ndarray]:
        """Every row to the shared batcher; if one fails, the others are cancelled: the batcher
        drops cancelled rows instead of spending model time on an answer nobody will read."""
        futures: list[asyncio.Future] = []
        # The only request in progress, with one image: the batcher may run it at once.
        alone = self.active == 1 and len(batch) == 1
        if alone and self.batcher.runs_inline():
            # Requests that came in with this one wait on the event loop behind it, and each
            # runs start to finish without yielding: without a yield here, every one of them
            # would find itself alone and run at batch 1. One turn of the loop lets them reach
            # the batcher first, so they share a run (28 px: 128 us per image at batch 1, about
            # 75 us from batch 4).
            await asyncio.sleep(0)
            alone = self.active == 1
        try:
            for row in batch:
                futures.append(self.batcher.enqueue(row, ctx, alone=alone))
            if len(futures) == 1:
                return [await futures[0]]
            return await asyncio.gather(*futures)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
