"""The service's own log format, set up the same way in the main process and every worker."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    """The service's own log lines; uvicorn configures its loggers itself. Spawned workers
    start with a bare interpreter, so :mod:`service.supervisor` calls this in each of them."""
    logging.basicConfig(
        level=level.upper() if level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
