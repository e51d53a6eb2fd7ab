"""Logits to answers: softmax and top-k with labels from the model's metadata."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32; subtracting the max keeps exp() from overflowing."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    """The ``k`` most probable classes, best first; ``k`` is clamped to ``[1, len(labels)]``.

    Ties keep the lower index first (stable sort), so answers are deterministic.
    """
    if probs.ndim != 1 or len(probs) != len(labels):
        raise ValueError(f"expected {len(labels)} probabilities, got shape {probs.shape}")
    k = max(1, min(int(k), len(labels)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {"label": labels[i], "index": int(i), "probability": float(probs[i])}
        for i in order.tolist()
    ]
