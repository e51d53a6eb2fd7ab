"""Admission control: refuse at the door what could not be answered within the latency budget.

A refused request must cost almost nothing, or refusals eat the capacity they protect: measured
before this module existed, every request the server would refuse still had its body read and its
image decoded, and under 6x overload goodput fell to 38% of capacity. So the decision is made
from numbers the server already has, before the work:

    predicted wait = sum over every loaded model of
                     (images queued or running + images admitted but not yet queued)
                     x that model's recent seconds per image
                     / lanes

Every model and version has its own batcher, but they share the process's lanes (the cores, see
:mod:`service.engine.lanes`), so a request to one model waits behind the work of all of them.

A request is refused (429, ``Retry-After`` from the same drain rate) when its predicted wait
exceeds ``max_delay_s`` (``SEPCONV_MAX_QUEUE_DELAY_MS``) or its images would not fit the queue.
Routes call :meth:`Admission.check` before reading a body; the classifier holds a
:meth:`Admission.reserve` while it decodes, so requests being decoded count as queued work and a
burst cannot be admitted all at once.

Refusals are paced (:meth:`Admission.pace`). A client that retries the moment it is refused
(``hey -c 800``, any closed loop that ignores ``Retry-After``) turns every refusal into another
request at once: measured on the 224 px model with 128 such clients, the refusal storm took the
cores from the model and goodput fell to a fifth of capacity. So refusals are answered at once up
to ``refusal_rate_factor`` times the model's own rate (a GCRA schedule with a short burst); past
that rate, each refusal is held until its own ``Retry-After`` has passed, then answered. A client
that retries at once then retries at the pace it was asked to, so a storm's refusals come at
about (its clients / Retry-After) per second however fast they are answered, and what they cost
the server and the clients' own cores stays bounded. Clients that wait as asked, and open-loop
overload below the paced rate, are never held. docs/overload.md has the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from service.engine.batcher import Batcher, retry_after
from service.engine.observer import NULL_OBSERVER, EngineObserver
from service.errors import Overloaded

#: How far ahead of now the refusal schedule may run: a storm is forgotten (refusals are answered
#: at once again) at most this long after it stops, however long it lasted.
MAX_REFUSAL_HOLD_S = 1.0
#: Refusals answered at once in a burst, as seconds of the paced rate.
REFUSAL_BURST_S = 0.05


class Admission:
    def __init__(
        self,
        batcher: Batcher,
        *,
        max_delay_s: float,
        refusal_rate_factor: float = 0.0,
        observer: EngineObserver = NULL_OBSERVER,
    ) -> None:
        if max_delay_s <= 0:
            raise ValueError("the latency budget must be positive")
        if refusal_rate_factor < 0:
            raise ValueError("the refusal rate factor must be 0 (no pacing) or positive")
        self.batcher = batcher
        self.max_delay_s = max_delay_s
        self.refusal_rate_factor = refusal_rate_factor
        self.observer = observer
        self.reserved = 0  # images admitted and being read or decoded, not yet queued
        self._next_refusal = 0.0  # GCRA's theoretical arrival time of the next refusal
        self.lanes = batcher.pool
        self.lanes.add_source(self)

    def close(self) -> None:
        """Stop counting this model's work in the shared lanes (it is unloaded)."""
        self.lanes.remove_source(self)

    def queued_seconds(self) -> float:
        """Model seconds of this model's images queued, running or admitted."""
        return self.batcher.queued_seconds(self.reserved)

    def predicted_wait(self) -> float:
        """Seconds a request arriving now would wait before its first image runs: the work of
        every model on the shared lanes."""
        return self.lanes.seconds_to_drain()

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

    def refusal_rate(self) -> float:
        """Refusals per second answered without delay; 0 when pacing is off or unmeasured."""
        # The nominal rate, not the EWMA: under load the EWMA sags, and pacing then started
        # to hold refusals at 4x overload, where none should wait.
        per_image = self.batcher.nominal_image_seconds
        if not self.refusal_rate_factor or not per_image:
            return 0.0
        return self.refusal_rate_factor * self.batcher.lanes / per_image

    def refusal_delay(self, now: float, retry_after_s: float = MAX_REFUSAL_HOLD_S) -> float:
        """Seconds this refusal waits before it is answered: none while refusals come at most
        at the paced rate (GCRA, one slot each, with a burst), else its ``retry_after_s``."""
        rate = self.refusal_rate()
        if rate <= 0:
            return 0.0
        slot = max(self._next_refusal, now)
        # Every refusal takes a slot, held or not, and the schedule never runs more than
        # MAX_REFUSAL_HOLD_S ahead: it tells a storm from a burst, and forgets it soon after.
        self._next_refusal = min(slot, now + REFUSAL_BURST_S + MAX_REFUSAL_HOLD_S) + 1.0 / rate
        return float(retry_after_s) if slot - now > REFUSAL_BURST_S else 0.0

    async def pace(self, retry_after_s: float = MAX_REFUSAL_HOLD_S) -> None:
        """Wait this refusal's turn; call it right before answering a refusal that tells the
        client to retry after ``retry_after_s``."""
        delay = self.refusal_delay(time.monotonic(), retry_after_s)
        if delay > 0:
            self.observer.refusal_held(delay)
            await asyncio.sleep(delay)

    def _refuse(self, reason: str, detail: str, images: int) -> None:
        for _ in range(images):
            self.observer.rejected(reason)
        raise Overloaded(detail, retry_after_s=retry_after(self.predicted_wait()))
