"""Admission control: refuse at the door what could not be answered within the latency budget.

A refused request must cost almost nothing, or refusals eat the capacity they protect: measured
before this module existed, every request the server would refuse still had its body read and its
image decoded, and under 6x overload goodput fell to 38% of capacity. So the decision is made
from numbers the server already has, before the work:

    predicted wait = (images queued or running + images admitted but not yet queued)
                     x recent model seconds per image / lanes

A request is refused (429, ``Retry-After`` from the same drain rate) when its predicted wait
exceeds ``max_delay_s`` (``SEPCONV_MAX_QUEUE_DELAY_MS``) or its images would not fit the queue.
Routes call :meth:`Admission.check` before reading a body; the classifier holds a
:meth:`Admission.reserve` while it decodes, so requests being decoded count as queued work and a
burst cannot be admitted all at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from service.engine.batcher import Batcher
from service.engine.observer import NULL_OBSERVER, EngineObserver
from service.errors import Overloaded


class Admission:
    def __init__(
        self,
        batcher: Batcher,
        *,
        max_delay_s: float,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        if max_delay_s <= 0:
            raise ValueError("the latency budget must be positive")
        self.batcher = batcher
        self.max_delay_s = max_delay_s
        self.observer = observer
        self.reserved = 0  # images admitted and being read or decoded, not yet queued

    def predicted_wait(self) -> float:
        """Seconds a request arriving now would wait before its first image runs."""
        return self.batcher.seconds_to_drain(self.reserved)

    def check(self, images: int = 1) -> None:
        """Raise :class:`Overloaded` if ``images`` more cannot be served within the budget."""
        batcher = self.batcher
        ahead = batcher.backlog + self.reserved
        if ahead + images > batcher.max_queue_size:
            self._refuse(
                "queue_full",
                f"the batch queue is full ({ahead} images queued or being decoded, "
                f"room for {batcher.max_queue_size}); retry later",
                images,
            )
        wait = self.predicted_wait()
        if wait > self.max_delay_s:
            self._refuse(
                "over_budget",
                f"the server is overloaded: about {wait * 1000:.0f} ms of work is queued ahead "
                f"of this request, over the {self.max_delay_s * 1000:g} ms budget "
                "(SEPCONV_MAX_QUEUE_DELAY_MS); retry later",
                images,
            )

    @contextlib.contextmanager
    def reserve(self, images: int) -> Iterator[None]:
        """Admit ``images`` (or raise) and count them as queued work until the block ends.

        End the block right before the images are enqueued: enqueueing does not await, so the
        work is never counted twice nor missed.
        """
        self.check(images)
        self.reserved += images
        try:
            yield
        finally:
            self.reserved -= images

    def _refuse(self, reason: str, detail: str, images: int) -> None:
        for _ in range(images):
            self.observer.rejected(reason)
        raise Overloaded(detail, retry_after_s=self.batcher.retry_after(self.reserved))
