"""Tracing and request-id logging on their own: spans into the SDK's in-memory exporter, log
records through the real handler configuration."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
import os
import subprocess
import sys
import time

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.server import free_port
from service import logs, tracing

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{PARENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracing.Tracing(provider), exporter
    provider.shutdown()


def by_name(exporter, name):
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_request_span_continues_the_callers_trace(spans):
    tr, exporter = spans
    request = tr.start_request("POST /v2/models/{name}/infer", {"traceparent": TRACEPARENT})
    assert request.trace_id == PARENT_TRACE
    now = time.time_ns()
    request.stage("decode", now, now + 1000, {"sepconv.images": 2})
    request.end()
    (root,) = by_name(exporter, "POST /v2/models/{name}/infer")
    (decode,) = by_name(exporter, "decode")
    assert format(root.context.trace_id, "032x") == PARENT_TRACE
    assert root.parent.span_id == 0x00F067AA0BA902B7 and root.parent.is_remote
    assert decode.parent.span_id == root.context.span_id
    assert decode.end_time - decode.start_time == 1000
    assert decode.attributes["sepconv.images"] == 2


def test_without_traceparent_a_new_trace_starts(spans):
    tr, exporter = spans
    request = tr.start_request("x", {})
    request.end(error="boom")
    (root,) = exporter.get_finished_spans()
    assert root.parent is None and not root.status.is_ok


def test_a_batch_links_the_requests_that_shared_it(spans):
    tr, exporter = spans
    a = tr.start_request("a", {})
    b = tr.start_request("b", {"traceparent": TRACEPARENT})
    t0 = time.monotonic()
    # a has two rows in the batch, b one; rows without a trace (None) are skipped.
    rows = [(a, t0 - 0.004), (b, t0 - 0.002), (a, t0 - 0.003), (None, t0)]
    tr.batch(7, t0, t0 + 0.010, rows)
    a.end()
    b.end()
    (batch,) = by_name(exporter, "batch")
    assert batch.parent is None
    assert batch.attributes["sepconv.batch.id"] == 7 and batch.attributes["sepconv.batch.size"] == 3
    linked = {link.context.span_id for link in batch.links}
    assert linked == {a.span.get_span_context().span_id, b.span.get_span_context().span_id}
    infers = {s.parent.span_id: s for s in by_name(exporter, "infer")}
    queues = {s.parent.span_id: s for s in by_name(exporter, "queue")}
    for request, rows_in_batch, waited in ((a, 2, 0.004), (b, 1, 0.002)):
        infer = infers[request.span.get_span_context().span_id]
        assert infer.attributes["sepconv.batch.id"] == 7
        assert infer.attributes["sepconv.rows"] == rows_in_batch
        assert [link.context.span_id for link in infer.links] == [batch.context.span_id]
        assert (infer.start_time, infer.end_time) == (batch.start_time, batch.end_time)
        queue = queues[request.span.get_span_context().span_id]
        assert queue.end_time == batch.start_time
        assert queue.end_time - queue.start_time == pytest.approx(waited * 1e9, rel=0.05)
    assert format(infers[b.span.get_span_context().span_id].context.trace_id, "032x") == (
        PARENT_TRACE
    )


def test_failed_batch_span_has_error_status(spans):
    tr, exporter = spans
    a = tr.start_request("a", {})
    t0 = time.monotonic()
    tr.batch(1, t0, t0 + 0.001, [(a, t0)], error="ORT failed")
    (batch,) = by_name(exporter, "batch")
    assert not batch.status.is_ok and batch.status.description == "ORT failed"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "opentelemetry.exporter.otlp.proto.http"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "opentelemetry.exporter.otlp.proto.grpc"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            "opentelemetry.exporter.otlp.proto.http",
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, "opentelemetry.sdk.trace.export"),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_exporter_follows_the_standard_variables(monkeypatch, env, expected):
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    exporter = tracing.exporter_from_env()
    if expected is None:
        assert exporter is None
    else:
        assert type(exporter).__module__.startswith(expected)
        exporter.shutdown()


@pytest.mark.parametrize(
    "env", [{"OTEL_TRACES_EXPORTER": "zipkin"}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}]
)
def test_unsupported_exporter_settings_fail_loudly(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="use"):
        tracing.exporter_from_env()


@pytest.mark.parametrize(
    ("env", "module", "what"),
    [
        ({}, "opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLP http/protobuf"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
            "OTLP grpc",
        ),
        ({"OTEL_TRACES_EXPORTER": "none"}, "opentelemetry.sdk.resources", "OpenTelemetry SDK"),
    ],
)
def test_without_the_tracing_extra_the_error_names_it(monkeypatch, env, module, what):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled module does on import
    with pytest.raises(tracing.TracingUnavailable) as err:
        tracing.Tracing.from_env()
    assert what in str(err.value) and "pip install 'sepconv-serve[tracing]'" in str(err.value)


def test_server_without_the_tracing_extra_refuses_to_start(tiny_model_path):
    """``python -m service`` with tracing on and no SDK: one line naming the extra, status 1."""
    code = (
        "import sys\n"
        "for name in ('opentelemetry.sdk', 'opentelemetry.sdk.trace'):\n"
        "    sys.modules[name] = None\n"
        "from service.__main__ import main\n"
        "sys.exit(main())\n"
    )
    env = {
        **os.environ,
        "SEPCONV_TRACING": "true",
        "SEPCONV_MODEL_PATH": str(tiny_model_path),
        # Where it would listen if it did start: free ports, and no gRPC.
        "SEPCONV_PORT": str(free_port()),
        "SEPCONV_GRPC_PORT": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "sepconv-serve: cannot start: SEPCONV_TRACING=true needs the OpenTelemetry SDK, which is "
        "not installed (no module 'opentelemetry.sdk.trace'): pip install 'sepconv-serve[tracing]'"
    ]


def test_service_name_defaults_and_otel_service_name_wins(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    tr = tracing.Tracing.from_env()
    assert tr.provider.resource.attributes["service.name"] == "sepconv-serve"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "classifier-eu")
    tr = tracing.Tracing.from_env()
    assert tr.provider.resource.attributes["service.name"] == "classifier-eu"


# --- request ids in logs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        (b"req/7:x=y", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("two words", False),
        ("line\nbreak", False),
        ("é", False),
        ("", False),
        (None, False),
    ],
)
def test_request_id_is_kept_only_when_safe_to_log(given, kept):
    got = logs.request_id_from(given)
    expected = given.decode() if isinstance(given, bytes) else given
    assert (got == expected) is kept
    assert logs._ACCEPTED.fullmatch(got)


def test_new_request_ids_are_unique():
    assert len({logs.new_request_id() for _ in range(1000)}) == 1000


@pytest.fixture
def captured():
    """The service's logging configuration, writing to a buffer; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def configure(fmt):
        logging.config.dictConfig(logs.logging_config("info", fmt))
        buffer = io.StringIO()
        root.handlers[0].setStream(buffer)
        return buffer

    yield configure
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_every_line_carries_the_request_id_of_its_task(captured):
    buffer = captured("text")
    log = logging.getLogger("service.test")

    async def handle(request_id: str) -> None:
        logs.request_id_var.set(request_id)
        # Not a wait: one turn of the loop, so the other request's task runs between this
        # one's setting its id and logging (a shared, not task-local, id would show).
        await asyncio.sleep(0)
        log.info("handling")
        logging.getLogger("uvicorn.error").info("from uvicorn")

    async def main() -> None:
        await asyncio.gather(handle("req-a"), handle("req-b"))

    asyncio.run(main())
    log.info("outside")
    lines = buffer.getvalue().splitlines()
    assert sum("[req-a] handling" in line for line in lines) == 1
    assert sum("[req-b] from uvicorn" in line for line in lines) == 1
    assert lines[-1].endswith("[-] outside")


def test_json_lines(captured):
    buffer = captured("json")
    token = logs.request_id_var.set("r-1")
    trace_token = logs.trace_id_var.set(PARENT_TRACE)
    try:
        logging.getLogger("service.test").warning("odd %s", "thing")
        try:
            raise RuntimeError("kaput")
        except RuntimeError:
            logging.getLogger("service.test").exception("failed")
    finally:
        logs.request_id_var.reset(token)
        logs.trace_id_var.reset(trace_token)
    first, second = (orjson.loads(line) for line in buffer.getvalue().splitlines())
    assert first["message"] == "odd thing" and first["level"] == "WARNING"
    assert first["request_id"] == "r-1" and first["trace_id"] == PARENT_TRACE
    assert first["logger"] == "service.test" and first["time"].endswith("+00:00")
    assert "RuntimeError: kaput" in second["error"]
