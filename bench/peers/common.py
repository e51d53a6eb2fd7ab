"""What every peer server shares: an ONNX Runtime session with ORT's defaults, and top-k.

Imported inside the peer processes, including the KServe virtual environment, so it needs only
numpy, onnxruntime and :mod:`sepconv` (which needs pydantic and Pillow).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from sepconv.spec import ModelSpec

#: Largest decoded image a peer accepts, the service's default bomb guard.
MAX_PIXELS = 40_000_000


def load_model(path: str) -> tuple[ort.InferenceSession, ModelSpec]:
    """A session as a user would create it: ORT's default options, CPU.

    Defaults on purpose: intra-op threads = physical cores and idle threads spinning, which is
    what a server written without tuning gets. The spec (labels, preprocessing) is read from
    the model's own metadata through ORT, so no peer needs the ``onnx`` package.
    """
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)
    return session, spec


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices, most probable first; ties in index order, as the service ranks."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, : min(k, probs.shape[-1])]
