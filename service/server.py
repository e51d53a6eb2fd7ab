"""Runs the app under uvicorn, with the drain delay between SIGTERM and the shutdown
(:mod:`service.drain` says why): one process, or one worker of :mod:`service.supervisor`."""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

from service.api.app import create_app
from service.drain import Drain
from service.settings import Settings

log = logging.getLogger("service.drain")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the drain delay between SIGTERM and its shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain, delay_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.delay_s = delay_s
        self._exit_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Only the first stop signal drains: a second SIGTERM, or one after a SIGINT, goes on
        # with (or cuts short to) the shutdown.
        first = not self.should_exit and self._exit_at is None
        self.drain.begin()
        # uvicorn's own bookkeeping (it re-raises the signal after shutdown, for the exit status).
        super().handle_exit(sig, frame)
        if first and sig == signal.SIGTERM and self.delay_s > 0 and self.started:
            # Signal handlers run on the event loop's thread, between its steps: on_tick cannot
            # see the should_exit that uvicorn just set.
            self.should_exit = False
            self._exit_at = time.monotonic() + self.delay_s
            log.info(
                "SIGTERM: draining for %.1f s (readiness 503, Connection: close), then shutting "
                "down",
                self.delay_s,
            )

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(
    settings: Settings,
    uvicorn_kwargs: dict[str, Any],
    sockets: list[socket.socket] | None = None,
    *,
    reuse_port: bool = False,
) -> bool:
    """Build the app and run it until shut down; False if its start-up failed. ``reuse_port``:
    this is one of several workers, whose other listening sockets (gRPC) join their port's
    SO_REUSEPORT group as the HTTP socket in ``sockets`` did."""
    drain = Drain()
    app = create_app(settings, drain=drain, reuse_port=reuse_port)
    config = uvicorn.Config(app, **uvicorn_kwargs)
    server = DrainingServer(config, drain, settings.drain_delay_s)
    server.run(sockets=sockets)
    return server.started
