"""Waiting for something to have happened, instead of sleeping and hoping it has.

A test that sleeps a fixed time assumes how fast the machine is, and flakes when it is busy.
Wait on an event set by a test double where there is one (a gate the model enters, an exporter
that notifies); otherwise poll the condition itself, often, with a generous bound, so a pass
costs no more than the condition takes and a failure says what never happened.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar

#: Long enough for the busiest CI machine; a passing wait returns as soon as its condition holds.
TIMEOUT_S = 30.0
#: How often a condition is checked.
INTERVAL_S = 0.01

T = TypeVar("T")


#: What a failed wait says: a string, or a function that describes the state it ended in.
Message = str | Callable[[], str]


def _failed(message: Message, timeout_s: float) -> AssertionError:
    text = message() if callable(message) else message
    return AssertionError(f"{text} (waited {timeout_s:g} s)")


def wait_until(
    predicate: Callable[[], T],
    message: Message,
    *,
    timeout_s: float = TIMEOUT_S,
    interval_s: float = INTERVAL_S,
) -> T:
    """Return ``predicate()``'s first truthy value; fail with ``message`` after ``timeout_s``.

    ``predicate`` may raise to give up early (a server process that exited, say); a callable
    ``message`` is asked at the end, so it can say how far things got.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise _failed(message, timeout_s)
        time.sleep(interval_s)
    return value


async def wait_until_async(
    predicate: Callable[[], T],
    message: Message,
    *,
    timeout_s: float = TIMEOUT_S,
    interval_s: float = INTERVAL_S,
) -> T:
    """:func:`wait_until` on an event loop: the loop keeps running (the batcher's worker, the
    tasks that enqueue) while the condition is checked."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise _failed(message, timeout_s)
        await asyncio.sleep(interval_s)
    return value


async def wait_event(
    event: threading.Event, message: Message, *, timeout_s: float = TIMEOUT_S
) -> None:
    """Wait on a thread's ``event`` (a model entered on an inference thread) without blocking
    the event loop."""
    if not await asyncio.to_thread(event.wait, timeout_s):
        raise _failed(message, timeout_s)
