"""The service's log lines, set up the same way in the main process and every worker: request
ids in every line, and JSON lines as an option (``SEPCONV_LOG_FORMAT=json``).

The id of the request being handled lives in a context variable: asyncio copies the context into
each task, so the id set where a request enters (HTTP middleware, gRPC servicer) is the one every
log call made on its behalf sees, with no parameter passing. A logging filter on the handler
copies it (and the trace id, while tracing is on) onto each record, so uvicorn's and the
libraries' lines carry it too. Lines logged outside a request show ``-``.

``X-Request-ID`` (HTTP header, or gRPC metadata ``x-request-id``) is accepted when it is a short
token of visible ASCII, so a client or a proxy can follow one request through its own logs and
ours; otherwise a fresh id is made. The response echoes it.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from itertools import count
from typing import Any

import orjson

REQUEST_ID_HEADER = "x-request-id"
#: The request being handled; None outside a request.
request_id_var: ContextVar[str | None] = ContextVar("sepconv_request_id", default=None)
#: The trace id of the request being handled (32 hex digits) while tracing is on.
trace_id_var: ContextVar[str | None] = ContextVar("sepconv_trace_id", default=None)
#: Whether the client chose the request id (``X-Request-ID``), or the server made it.
_client_chose_id: ContextVar[bool] = ContextVar("sepconv_client_chose_id", default=False)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_ACCEPTED = re.compile(r"[!-~]{1,128}")  # visible ASCII: nothing that could forge a log line

# A process prefix and a counter: unique per process run, and 20x cheaper than uuid4 on the
# hot path (no system call per request).
_prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"
_counter = count(1)


def new_request_id() -> str:
    return f"{_prefix}-{next(_counter):x}"


def request_id_from(value: str | bytes | None) -> str:
    """The client's id if it is acceptable, else a new one."""
    if value:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if _ACCEPTED.fullmatch(value):
            return value
    return new_request_id()


def start_request(header_value: str | bytes | None) -> str:
    """The id of the request now being handled, from its ``X-Request-ID`` or made; set for the
    log lines of the current task and its children."""
    if isinstance(header_value, bytes):
        header_value = header_value.decode("latin-1")
    request_id = request_id_from(header_value)
    request_id_var.set(request_id)
    _client_chose_id.set(request_id == header_value)
    return request_id


def adopt_request_id(protocol_id: str | None) -> None:
    """A protocol's own request id (the OIP ``id``) names the request when the client sent no
    ``X-Request-ID``, so the id a client knows is the one in our logs and response headers."""
    if protocol_id and not _client_chose_id.get() and _ACCEPTED.fullmatch(protocol_id):
        request_id_var.set(protocol_id)


class RequestIdFilter(logging.Filter):
    """Puts ``request_id`` (and ``trace_id``) on every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        record.trace_id = trace_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, trace id, error."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or "-",
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            doc["trace_id"] = trace_id
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["error"] = record.exc_text
        return orjson.dumps(doc).decode()


def logging_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for the service and uvicorn (pass it as uvicorn's
    ``log_config``), so uvicorn's own lines carry the request id and the format too."""
    level = "DEBUG" if level.lower() == "trace" else level.upper()
    formatter: dict[str, Any] = (
        {"()": "service.logs.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "service.logs.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # uvicorn's loggers keep their own handlers unless told otherwise.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
        },
    }


def configure_logging(level: str, fmt: str = "text") -> None:
    """The service's own log lines before uvicorn starts (uvicorn then applies the same
    configuration, passed as its ``log_config``). Spawned workers start with a bare interpreter,
    so :mod:`service.supervisor` calls this in each of them."""
    logging.config.dictConfig(logging_config(level, fmt))
