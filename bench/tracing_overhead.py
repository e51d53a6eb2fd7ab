"""What request ids and tracing cost per request: ``python -m bench.tracing_overhead``.

Calls the real app in-process (ASGI, no sockets, so the network stack's noise stays out) with
``POST /v2/models/{name}/infer`` and a preprocessed tensor of the default model, through the
whole server path: middleware, route, Classifier, batcher, ONNX Runtime, response. Variants:

- ``no request ids``: the app without its service middleware (request ids, and the HTTP
  metrics, drain and body limit that share its one layer) and tracing off;
- ``tracing off``: the default (request ids on, ``SEPCONV_TRACING=false``);
- ``tracing on``: the OpenTelemetry SDK recording every span (request, queue, infer, respond,
  batch) into a batch span processor whose exporter drops them, so no network I/O is counted.

The variants take turns in short rounds (so machine noise hits all of them alike) and each
result is the median over rounds of the mean time per request, wall clock and this process's
CPU time (which the rest of a shared machine's load disturbs less). Requests run one at a time:
the per-request cost, not throughput under load, which ``python -m bench`` measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from bench import RESULTS
from bench.models import DEFAULT_MODEL, default_model, normalized_batch


class _DropExporter:
    """A span exporter that accepts and forgets: the SDK's cost without an exporter's I/O."""

    def export(self, spans: Sequence) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


async def _call(app, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    delivered = False
    status = 0

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(model_path: Path, rounds: int, per_round: int) -> dict[str, dict]:
    """One app, one model session and batcher for every variant: only the request-id
    middleware and the tracing hooks change between them, so the session's own speed (which
    differs from one session to the next) cannot pass for their cost."""
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from sepconv.spec import read_spec
    from service.api.app import create_app
    from service.api.fastpath import FastPath
    from service.api.middleware import ServiceMiddleware
    from service.engine.observer import FanOut
    from service.settings import Settings
    from service.tracing import Tracing, TracingObserver

    spec = read_spec(str(model_path))
    x = normalized_batch(spec, 1)
    item = {"name": spec.input_name, "datatype": "FP32", "shape": list(x.shape)}
    body = orjson.dumps({"inputs": [{**item, "data": x.ravel().tolist()}]})
    path = f"/v2/models/{spec.name}/infer"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    settings = Settings(model_path=model_path, grpc_port=0, warmup_runs=2)
    app = create_app(settings)
    # The app inside its service middleware; the variants wrap it themselves.
    stack = FastPath(FastAPI.build_middleware_stack(app), app)

    async def inner(scope, receive, send):
        scope["app"] = app  # what the app's own __call__ sets
        await stack(scope, receive, send)

    def layer(tracing: Tracing | None) -> ServiceMiddleware:
        return ServiceMiddleware(
            inner, drain=app.state.drain, max_body_bytes=settings.max_body_bytes, tracing=tracing
        )

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DropExporter()))
    tracing = Tracing(provider)
    means: dict[str, list[float]] = {}
    cpu_means: dict[str, list[float]] = {}  # this process's CPU time: other load shows less
    async with app.router.lifespan_context(app):
        classifier = app.state.repository.lookup().classifier
        plain = classifier.observer
        traced = FanOut(plain, TracingObserver(tracing, spec.name, spec.version))
        variants = {
            "no request ids": (inner, plain),
            "tracing off": (layer(None), plain),
            "tracing on": (layer(tracing), traced),
        }
        for _ in range(rounds + 1):  # the first round warms every path and is not counted
            for variant, (entry, observer) in variants.items():
                classifier.observer = classifier.batcher.observer = observer
                classifier.admission.observer = observer
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(per_round):
                    assert await _call(entry, path, body, headers) == 200
                means.setdefault(variant, []).append((time.perf_counter() - start) / per_round)
                cpu_means.setdefault(variant, []).append((time.process_time() - cpu) / per_round)
    provider.shutdown()
    return {"wall": _summary(means), "cpu": _summary(cpu_means)}


async def measure_middleware(rounds: int, per_round: int) -> dict[str, dict]:
    """The same three variants around an app that only answers 200: the middleware's own cost,
    without the model run that dominates (and adds noise to) the end-to-end figures."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from service.api.middleware import ServiceMiddleware
    from service.drain import Drain
    from service.tracing import Tracing

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DropExporter()))
    variants = {
        "no request ids": ok,
        "tracing off": ServiceMiddleware(ok, drain=Drain(), max_body_bytes=1 << 20),
        "tracing on": ServiceMiddleware(
            ok, drain=Drain(), max_body_bytes=1 << 20, tracing=Tracing(provider)
        ),
    }
    path = "/v2/models/m/infer"
    means: dict[str, list[float]] = {}
    cpu_means: dict[str, list[float]] = {}
    for _ in range(rounds + 1):
        for variant, entry in variants.items():
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                await _call(entry, path, b"", [(b"x-request-id", b"bench-1")])
            means.setdefault(variant, []).append((time.perf_counter() - start) / per_round)
            cpu_means.setdefault(variant, []).append((time.process_time() - cpu) / per_round)
    provider.shutdown()
    return {"wall": _summary(means), "cpu": _summary(cpu_means)}


def _summary(means: dict[str, list[float]]) -> dict[str, dict]:
    """Median (and quartiles) over rounds, the first round left out as warm-up."""
    base = statistics.median(means["no request ids"][1:])
    out = {}
    for variant, samples in means.items():
        samples = samples[1:]
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [median] * 3
        out[variant] = {
            "us_per_request": round(median * 1e6, 2),
            "iqr_us": [round(quartiles[0] * 1e6, 2), round(quartiles[-1] * 1e6, 2)],
            "vs_no_request_ids_us": round((median - base) * 1e6, 2),
        }
    return out


def _table(results: dict[str, dict]) -> None:
    print("| variant | wall us / request | IQR | vs no request ids | CPU us / request | vs |")
    print("|---|---|---|---|---|---|")
    for variant, r in results["wall"].items():
        c = results["cpu"][variant]
        iqr = f"{r['iqr_us'][0]}-{r['iqr_us'][1]}"
        print(
            f"| {variant} | {r['us_per_request']} | {iqr} | {r['vs_no_request_ids_us']:+} "
            f"| {c['us_per_request']} | {c['vs_no_request_ids_us']:+} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="ONNX model (default: %(default)s, else an untrained stand-in of its shape)",
    )
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--per-round", type=int, default=200)
    ap.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "tracing_overhead.json",
        help="also write the results here (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    micro = asyncio.run(measure_middleware(args.rounds, 50 * args.per_round))
    print(
        f"Middleware alone (an app that answers 200); {args.rounds} rounds x {50 * args.per_round}"
    )
    _table(micro)
    model = default_model(args.model)
    results = asyncio.run(measure(model.path, args.rounds, args.per_round))
    print(f"\nWhole request, {model.title}; {args.rounds} rounds x {args.per_round} sequential")
    _table(results)
    if args.json:
        document = {"middleware": micro, "whole_request": {"model": model.title, **results}}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
