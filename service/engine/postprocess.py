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
    if probs.ndim != 1:
        raise ValueError(f"expected {len(labels)} probabilities, got shape {probs.shape}")
    return top_k_rows(probs[None], k, labels)[0]


def top_k_rows(probs: np.ndarray, k: int, labels: list[str]) -> list[list[dict]]:
    """:func:`top_k` of every row of ``probs`` (N, classes), ranked in one call and read out
    as Python numbers once (``tolist``), not element by element."""
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"expected {len(labels)} probabilities, got shape {probs.shape}")
    order = top_k_indices(probs, max(1, k)).tolist()
    return [
        [{"label": labels[i], "index": i, "probability": row[i]} for i in ranked]
        for ranked, row in zip(order, probs.tolist(), strict=True)
    ]
