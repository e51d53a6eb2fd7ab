"""The servers compared, how each is started, and the requests each is sent.

Three request formats, each one a user of that server sends:

- ``v1``: ``POST /v1/classify`` with the encoded image as the raw body (PNG for greyscale
  models, JPEG for RGB, the bodies :func:`bench.models.sample_images` makes). sepconv-serve and
  the plain FastAPI peer both take it and answer ``{"results": [{"predictions": [...]}]}``.
- ``oip-json``: ``POST /v2/models/{name}/infer`` with the same image base64-encoded in a BYTES
  input, top 5 requested through the classification extension: what KServe's REST examples
  send for an image. sepconv-serve answers it too, so the two are compared on identical bytes.
- ``oip-binary``: the same request with the image as binary tensor data after the JSON
  (Triton's extension; what ``tritonclient`` sends), for sepconv-serve only.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bench
from bench.models import BenchModel, image_format, sample_images
from bench.server import ManagedServer, free_port
from service.protocols import oip

REPO_ROOT = Path(bench.__file__).resolve().parent.parent
TOP_K = 5
SERVERS = ("sepconv", "fastapi", "kserve")
#: What each server is measured with, first protocol first.
PROTOCOLS = {
    "sepconv": ("v1", "oip-json", "oip-binary"),
    "fastapi": ("v1",),
    "kserve": ("oip-json",),
}
TITLES = {
    "sepconv": "sepconv-serve, no settings",
    "fastapi": "plain FastAPI + ORT",
    "kserve": "KServe ModelServer",
    "raw": "raw ONNX Runtime",
}


@dataclass(frozen=True)
class Requests:
    path: str
    bodies: tuple[bytes, ...]
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus every ``SEPCONV_*`` setting, plus this source tree.

    Stripping the settings is what makes "sepconv-serve with no flags" mean the defaults, whoever
    runs the bench; PYTHONPATH makes every child, in any venv, import this tree's packages.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPCONV_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def start(
    server: str, model: BenchModel, log_path: Path, *, kserve_python: Path | None = None
) -> ManagedServer:
    """An unstarted :class:`ManagedServer` for ``server`` on ``model``; enter it to start."""
    port = free_port()
    path = str(model.path.resolve())
    if server == "sepconv":
        argv = [sys.executable, "-m", "service", "--model-path", path, "--port", str(port)]
        return ManagedServer(
            argv, port, "/readyz", log_path, env=child_env(), workers=sepconv_workers(model)
        )
    if server == "fastapi":
        argv = [sys.executable, "-m", "uvicorn", "bench.peers.plain_fastapi:create_app"]
        argv += ["--factory", "--host", "127.0.0.1", "--port", str(port)]
        env = child_env({"PEER_MODEL_PATH": path})
        return ManagedServer(argv, port, "/openapi.json", log_path, env=env)
    if server == "kserve":
        if kserve_python is None:
            raise ValueError("kserve needs the python of its venv (bench.peers.venvs)")
        argv = [str(kserve_python), "-m", "bench.peers.kserve_model", "--model_path", path]
        argv += ["--model_name", model.spec.name, "--http_port", str(port)]
        argv += ["--grpc_port", str(free_port())]
        ready = f"/v2/models/{model.spec.name}/ready"
        return ManagedServer(argv, port, ready, log_path, env=child_env())
    raise ValueError(f"unknown server {server!r}; expected one of {', '.join(SERVERS)}")


def sepconv_workers(model: BenchModel) -> int:
    """How many worker processes sepconv-serve will start with no settings, as it decides."""
    from service.settings import Settings

    settings = Settings(model_path=model.path)
    return getattr(settings, "resolved_workers", settings.workers)


def oip_json_body(image: bytes, top_k: int = TOP_K) -> bytes:
    doc = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(image).decode("ascii")],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": top_k}}],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def requests_for(protocol: str, model: BenchModel, count: int = 64) -> Requests:
    images = sample_images(model.spec, count=count)
    if protocol == "v1":
        return Requests("/v1/classify", tuple(images), image_format(model.spec)[1])
    path = f"/v2/models/{model.spec.name}/infer"
    if protocol == "oip-json":
        return Requests(path, tuple(oip_json_body(i) for i in images), "application/json")
    if protocol == "oip-binary":
        bodies = [oip_binary_body(i) for i in images]
        lengths = {header for header, _ in bodies}
        if len(lengths) != 1:
            raise RuntimeError("OIP headers differ in length across the sample images")
        return Requests(
            path,
            tuple(body for _, body in bodies),
            oip.BINARY_CONTENT_TYPE,
            ((oip.HEADER_LENGTH, str(lengths.pop())),),
        )
    raise ValueError(f"unknown protocol {protocol!r}; expected v1, oip-json or oip-binary")


def oip_binary_body(image: bytes, top_k: int = TOP_K) -> tuple[int, bytes]:
    """(JSON header length, body): the image as binary BYTES data after the JSON (Triton's
    binary tensor extension, what tritonclient sends), the top ``top_k`` asked for in JSON."""
    data = oip.serialize_bytes([image])
    doc = {
        "inputs": [
            {
                "name": oip.IMAGE_INPUT,
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "outputs": [{"name": oip.OUTPUT_NAME, "parameters": {"classification": top_k}}],
    }
    header = json.dumps(doc, separators=(",", ":")).encode()
    return len(header), header + data


def top1(protocol: str, answer: bytes) -> tuple[int, float]:
    """(class index, probability) of the best class in a server's answer."""
    doc = json.loads(answer)
    if protocol == "v1":
        best = doc["results"][0]["predictions"][0]
        return int(best["index"]), float(best["probability"])
    score, index, _label = doc["outputs"][0]["data"][0].split(":", 2)
    return int(index), float(score)


def post(base_url: str, requests: Requests, body: bytes, timeout_s: float = 30.0) -> bytes:
    headers = {"Content-Type": requests.content_type, **dict(requests.headers)}
    request = urllib.request.Request(base_url + requests.path, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def check_answer(protocol: str, answer: bytes, reference: np.ndarray, tol: float = 1e-4) -> None:
    """Raise ValueError unless the answer's best class is a best class of ``reference``.

    Compared by probability, not index: an untrained model's classes are near ties, and
    servers running ORT with different thread counts may round the tie either way.
    """
    try:
        index, prob = top1(protocol, answer)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"unreadable {protocol} answer {answer[:200]!r}: {exc}") from exc
    if not 0 <= index < len(reference):
        raise ValueError(f"class index {index} is out of range")
    if abs(reference[index] - prob) > tol or prob < reference.max() - tol:
        raise ValueError(
            f"best class {index} at {prob:.6f}; the model gives it {reference[index]:.6f} "
            f"and its best class {int(reference.argmax())} {reference.max():.6f}"
        )
