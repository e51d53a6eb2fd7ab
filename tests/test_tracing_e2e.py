"""Tracing and request ids through the real server: spans of HTTP and gRPC inference requests in
the SDK's in-memory exporter, a W3C traceparent continued from both transports, a batch span
linking the requests that shared it, real OTLP exports (HTTP and gRPC) to a receiver running in
the test, and the request id in responses and log lines."""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.server import free_port
from sepconv.spec import read_spec
from service.engine.batcher import BatchFailedError
from service.logs import RequestIdFilter
from service.tracing import Tracing

from .conftest import FailingBatcher
from .test_grpc import Gate, Served, _settings, fp32, gated, swapped, wait_queued
from .waiting import TIMEOUT_S

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{PARENT_TRACE}-00f067aa0ba902b7-01"


class NotifyingExporter(InMemorySpanExporter):
    """Keeps spans in memory and wakes whoever waits for one (:func:`_wait_for`)."""

    def __init__(self) -> None:
        super().__init__()
        self.exported = threading.Condition()

    def export(self, spans):
        result = super().export(spans)
        with self.exported:
            self.exported.notify_all()
        return result


@pytest.fixture(scope="module")
def spans():
    exporter = NotifyingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


@pytest.fixture(scope="module")
def traced(tiny_model_path, spans):
    from service.api.app import create_app

    tracing, _ = spans
    server = Served(create_app(_settings(tiny_model_path, tracing=True), tracing=tracing))
    yield server
    server.stop()


@pytest.fixture
def exporter(spans):
    _, exporter = spans
    exporter.clear()
    return exporter


@pytest.fixture(scope="module")
def spec(tiny_model_path):
    return read_spec(str(tiny_model_path))


def _tensor_body(x: np.ndarray) -> bytes:
    item = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [item]})


def _wait_for(exporter: NotifyingExporter, name: str, count: int = 1) -> list:
    """Spans end when the response is sent, a moment after the client has it: wait until
    ``count`` spans called ``name`` are exported, and return them."""

    def found() -> list:
        return [s for s in exporter.get_finished_spans() if s.name == name]

    with exporter.exported:
        if not exporter.exported.wait_for(lambda: len(found()) >= count, TIMEOUT_S):
            ended = [s.name for s in exporter.get_finished_spans()]
            raise AssertionError(f"not {count} {name!r} spans within {TIMEOUT_S:g} s: {ended}")
    return found()


def _children(exporter, parent) -> dict[str, object]:
    return {
        s.name: s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    }


def test_http_infer_span_continues_the_callers_trace(traced, exporter, spec, make_png):
    url = f"http://{traced.http_url}/v1/classify"
    png = make_png(seed=1)
    response = httpx.post(
        url,
        content=png,
        headers={"content-type": "image/png", "traceparent": TRACEPARENT, "x-request-id": "t-1"},
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "t-1"
    (root,) = _wait_for(exporter, "POST /v1/classify")
    assert format(root.context.trace_id, "032x") == PARENT_TRACE
    assert root.parent.span_id == 0x00F067AA0BA902B7
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["sepconv.request_id"] == "t-1"
    stages = _children(exporter, root)
    assert {"decode", "queue", "infer", "respond"} <= set(stages)
    assert stages["decode"].end_time <= stages["infer"].start_time
    assert stages["queue"].end_time == stages["infer"].start_time
    assert stages["infer"].end_time <= stages["respond"].start_time <= root.end_time
    (batch,) = _wait_for(exporter, "batch")
    assert stages["infer"].links[0].context.span_id == batch.context.span_id
    assert [link.context.span_id for link in batch.links] == [root.context.span_id]


def test_grpc_infer_span_continues_the_callers_trace(traced, exporter, spec):
    with tgrpc.InferenceServerClient(traced.grpc_url) as c:
        c.infer(
            spec.name,
            [fp32(np.zeros((2, 1, 28, 28), np.float32))],
            headers={"traceparent": TRACEPARENT},
        )
        assert c.is_server_live()  # not an inference: no span
    (root,) = _wait_for(exporter, "inference.GRPCInferenceService/ModelInfer")
    assert format(root.context.trace_id, "032x") == PARENT_TRACE
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.grpc.status_code"] == 0
    stages = _children(exporter, root)
    assert {"queue", "infer", "respond"} <= set(stages) and "decode" not in stages
    assert stages["infer"].attributes["sepconv.rows"] == 2
    names = {s.name for s in exporter.get_finished_spans()}
    assert not any("ServerLive" in n for n in names)


def test_requests_sharing_a_batch_are_linked(traced, exporter, spec):
    batcher = traced.state.repository.lookup().classifier.batcher
    gate = Gate(batcher.run_batch)
    x = np.zeros((1, 1, 28, 28), np.float32)
    url = f"http://{traced.http_url}/v2/models/{spec.name}/infer"

    def via_http():
        httpx.post(url, content=_tensor_body(x), timeout=30)

    def via_grpc():
        with tgrpc.InferenceServerClient(traced.grpc_url) as c:
            c.infer(spec.name, [fp32(x)])

    with gated(batcher, gate):
        first = threading.Thread(target=via_http)
        first.start()
        gate.wait_entered()
        threads = [threading.Thread(target=f) for f in (via_http, via_grpc)]
        for t in threads:
            t.start()
        wait_queued(batcher, 2)
        gate.opened.set()
        for t in [first, *threads]:
            t.join(30)
    batches = _wait_for(exporter, "batch", 2)
    shared = max(batches, key=lambda b: len(b.links))
    assert len(shared.links) == 2 and shared.attributes["sepconv.batch.size"] == 2
    roots = {s.context.span_id: s.name for s in exporter.get_finished_spans() if s.parent is None}
    linked = {roots.get(link.context.span_id) for link in shared.links}
    assert linked == {
        "POST /v2/models/{model_name}/infer",
        "inference.GRPCInferenceService/ModelInfer",
    }
    infers = [s for s in exporter.get_finished_spans() if s.name == "infer"]
    assert (
        sum(
            s.attributes["sepconv.batch.id"] == shared.attributes["sepconv.batch.id"]
            for s in infers
        )
        == 2
    )


def test_failed_request_span_has_error_status(traced, exporter, spec):
    classifier = traced.state.repository.lookup().classifier
    url = f"http://{traced.http_url}/v2/models/{spec.name}/infer"
    with swapped(classifier, batcher=FailingBatcher(BatchFailedError("ORT exploded"))):
        response = httpx.post(url, content=_tensor_body(np.zeros((1, 1, 28, 28), np.float32)))
    assert response.status_code == 500
    (root,) = _wait_for(exporter, "POST /v2/models/{model_name}/infer")
    assert not root.status.is_ok
    assert any(event.name == "exception" for event in root.events)


def test_no_spans_for_operational_endpoints(traced, exporter):
    base = f"http://{traced.http_url}"
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/metrics").status_code == 200
    # A marker: an inference request refused before the model (so no batch span). Spans end
    # as their responses are sent, so once the marker's has ended, the others would have too.
    marker = httpx.post(f"{base}/v1/classify", content=b"", headers={"content-type": "image/png"})
    assert marker.status_code == 400, marker.text
    (root,) = _wait_for(exporter, "POST /v1/classify")
    spans = exporter.get_finished_spans()
    others = [s.name for s in spans if s.context.trace_id != root.context.trace_id]
    assert others == []


# --- request ids -----------------------------------------------------------------------------


def test_request_ids_are_echoed_made_and_adopted(traced, spec):
    base = f"http://{traced.http_url}"
    made = httpx.get(f"{base}/healthz").headers["x-request-id"]
    assert made and made != httpx.get(f"{base}/healthz").headers["x-request-id"]
    assert (
        httpx.get(f"{base}/healthz", headers={"x-request-id": "mine"}).headers["x-request-id"]
        == "mine"
    )
    # An unsafe id is replaced, never echoed.
    assert (
        httpx.get(f"{base}/healthz", headers={"x-request-id": "a b"}).headers["x-request-id"]
        != "a b"
    )
    doc = {"id": "oip-9", **orjson.loads(_tensor_body(np.zeros((1, 1, 28, 28), np.float32)))}
    url = f"{base}/v2/models/{spec.name}/infer"
    response = httpx.post(url, content=orjson.dumps(doc))
    assert response.json()["id"] == "oip-9" and response.headers["x-request-id"] == "oip-9"
    response = httpx.post(url, content=orjson.dumps(doc), headers={"x-request-id": "hdr"})
    assert response.json()["id"] == "oip-9" and response.headers["x-request-id"] == "hdr"


def test_log_lines_carry_the_request_id(traced, spec, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    classifier = traced.state.repository.lookup().classifier
    url = f"http://{traced.http_url}/v2/models/{spec.name}/infer"
    body = _tensor_body(np.zeros((1, 1, 28, 28), np.float32))
    with (
        caplog.at_level(logging.INFO),
        swapped(classifier, batcher=FailingBatcher(BatchFailedError("ORT exploded"))),
    ):
        httpx.post(url, content=body, headers={"x-request-id": "log-me"})
        with tgrpc.InferenceServerClient(traced.grpc_url) as c, contextlib.suppress(Exception):
            c.infer(
                spec.name,
                [fp32(np.zeros((1, 1, 28, 28), np.float32))],
                headers={"x-request-id": "log-me-too"},
            )
    by_id = {r.request_id for r in caplog.records if "ORT exploded" in r.getMessage()}
    assert {"log-me", "log-me-too"} <= by_id, [
        (r.request_id, r.getMessage()) for r in caplog.records
    ]


# --- real OTLP exports ------------------------------------------------------------------------


class OtlpHttpReceiver(BaseHTTPRequestHandler):
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def do_POST(self):  # noqa: N802 (the handler API's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        assert (
            self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
        )
        type(self).received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


class OtlpGrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802
        self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def otlp_receiver(protocol: str):
    """An OTLP collector endpoint on loopback; yields (endpoint, received requests)."""
    if protocol == "http/protobuf":
        OtlpHttpReceiver.received = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), OtlpHttpReceiver)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", OtlpHttpReceiver.received
        finally:
            server.shutdown()
            server.server_close()
    else:
        receiver = OtlpGrpcReceiver()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"http://127.0.0.1:{port}", receiver.received
        finally:
            server.stop(None)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_reach_a_real_otlp_receiver(monkeypatch, tiny_model_path, spec, protocol):
    """``SEPCONV_TRACING=true`` and nothing but the standard OTEL_* variables."""
    from service.api.app import create_app

    with otlp_receiver(protocol) as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "classifier-test")
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        server = Served(create_app(_settings(tiny_model_path, tracing=True, grpc_port=free_port())))
        try:
            with tgrpc.InferenceServerClient(server.grpc_url) as c:
                c.infer(
                    spec.name,
                    [fp32(np.zeros((1, 1, 28, 28), np.float32))],
                    headers={"traceparent": TRACEPARENT},
                )
        finally:
            server.stop()  # the lifespan flushes the exporter
        spans = [
            (resource.resource, span)
            for request in received
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
    names = {span.name for _, span in spans}
    assert {"inference.GRPCInferenceService/ModelInfer", "queue", "infer", "respond", "batch"} <= (
        names
    )
    root = next(s for _, s in spans if s.name == "inference.GRPCInferenceService/ModelInfer")
    assert root.trace_id.hex() == PARENT_TRACE
    service_names = {
        attr.value.string_value
        for resource, _ in spans
        for attr in resource.attributes
        if attr.key == "service.name"
    }
    assert service_names == {"classifier-test"}
