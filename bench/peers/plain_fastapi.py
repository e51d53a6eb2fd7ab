"""The plain FastAPI + ONNX Runtime server a user writes in ten minutes: the c=1 yardstick.

One route, no batching, no thread hop: the handler is ``async def`` and calls ``session.run``
on the event loop, the pattern most tutorials show. ORT keeps its defaults (all physical cores,
idle threads spinning). The preprocessing is the project's own, so the work per image is the
same as sepconv-serve's and only the serving stack differs.

Run it the way such a server is run, uvicorn with default settings, one process::

    PEER_MODEL_PATH=artifacts/model.onnx uvicorn bench.peers.plain_fastapi:create_app --factory

``POST /v1/classify`` takes the encoded image as the raw body (as sepconv-serve's ``/v1`` does)
and answers in the same JSON shape, so one load-generator request serves both.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException, Query, Request

from bench.peers.common import MAX_PIXELS, load_model, softmax, top_k
from sepconv.preprocess import ImageError, ImageTooLargeError, preprocess_bytes

MODEL_PATH_ENV = "PEER_MODEL_PATH"


def create_app(model_path: str | None = None) -> FastAPI:
    path = model_path or os.environ.get(MODEL_PATH_ENV)
    if not path:
        raise RuntimeError(f"set {MODEL_PATH_ENV} to the ONNX model to serve")
    session, spec = load_model(path)
    app = FastAPI(title="plain FastAPI + ONNX Runtime")

    @app.post("/v1/classify")
    async def classify(request: Request, top_k_: int = Query(5, alias="top_k", ge=1)) -> dict:
        body = await request.body()
        try:
            x = preprocess_bytes(body, spec, max_pixels=MAX_PIXELS)
        except ImageTooLargeError as exc:
            raise HTTPException(413, str(exc)) from exc
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from exc
        logits = session.run([spec.output_name], {spec.input_name: x[None]})[0]
        probs = softmax(logits)
        order = top_k(probs, top_k_)[0]
        predictions = [
            {"label": spec.labels[i], "index": int(i), "probability": float(probs[0, i])}
            for i in order
        ]
        return {
            "model": {"name": spec.name, "version": spec.version},
            "results": [{"filename": None, "predictions": predictions}],
        }

    return app
