"""Softmax and top-k (service/engine/postprocess.py): every protocol ranks through them."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from sepconv.spec import ModelSpec
from service.engine.postprocess import softmax, top_k, top_k_rows
from service.protocols.v1 import classify_response

LABELS = ["a", "b", "c", "d"]


def test_top_k_rows_ranks_every_row_best_first_ties_in_index_order():
    probs = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]], np.float32)
    rows = top_k_rows(probs, 3, LABELS)
    assert [[p["index"] for p in row] for row in rows] == [[1, 3, 0], [0, 1, 2]]
    assert rows[0][0] == {"label": "b", "index": 1, "probability": float(np.float32(0.4))}
    # Python numbers, as orjson writes them: the same bytes as the float32 values' floats.
    assert all(type(p["probability"]) is float and type(p["index"]) is int for p in rows[0])
    assert rows == [top_k(row, 3, LABELS) for row in probs]


def test_k_is_clamped_to_the_classes():
    probs = softmax(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32))
    assert len(top_k_rows(probs, 10, LABELS)[0]) == 4
    assert len(top_k_rows(probs, 0, LABELS)[0]) == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected 4 probabilities"):
        top_k_rows(np.zeros((1, 3), np.float32), 2, LABELS)
    with pytest.raises(ValueError, match="expected 4 probabilities"):
        top_k(np.zeros((2, 4), np.float32), 2, LABELS)


def test_v1_response_lists_each_image_with_its_file_name():
    spec = ModelSpec(
        name="m",
        version="3",
        labels=LABELS,
        input_size=8,
        color_mode="L",
        mean=[0.5],
        std=[0.25],
        alpha=0.25,
    )
    probs = softmax(np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]], np.float32))
    doc = orjson.loads(classify_response(spec, probs, ["x.png", "y.png"], 2))
    assert doc["model"] == {"name": "m", "version": "3"}
    assert [r["filename"] for r in doc["results"]] == ["x.png", "y.png"]
    assert [p["label"] for p in doc["results"][0]["predictions"]] == ["d", "c"]
    assert [p["label"] for p in doc["results"][1]["predictions"]] == ["a", "b"]
    assert orjson.loads(classify_response(spec, probs[:1], [], 1))["results"][0]["filename"] is None
