"""Logits to answers: softmax and top-k with labels from the model's metadata.

Every protocol ranks classes through :func:`top_k_indices`, so ``/v1``'s predictions and OIP's
classification strings can never disagree on order or ties.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32; subtracting the max keeps exp() from overflowing."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """(N, min(k, classes)) class indices per row, most probable first.

    A stable sort on the negated scores keeps ties in index order, so answers are deterministic.
    """
    k = min(int(k), probs.shape[-1])
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


def top_k(probs: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """The ``k`` most probable classes of one image, best first; ``k`` clamped to
    ``[1, len(labels)]``."""
    if probs.ndim != 1 or len(probs) != len(labels):
        raise ValueError(f"expected {len(labels)} probabilities, got shape {probs.shape}")
    order = top_k_indices(probs, max(1, k))
    return [
        {"label": labels[i], "index": int(i), "probability": float(probs[i])}
        for i in order.tolist()
    ]
