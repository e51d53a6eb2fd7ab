"""Exact, graph-derived compute cost of an ONNX model, and what ONNX Runtime makes of it.

The one implementation behind ``GET /v1/cost`` and ``python -m model cost``. Every count comes
from the graph itself: the batch axis is fixed to 1, ``onnx.shape_inference`` gives each tensor
its shape at the model's input size, and the mult-adds of each Conv/Gemm/MatMul follow from
those shapes and the node's attributes. Nothing is looked up in a table, so the report is right
for any width multiplier, input size or hand-made graph.

- :mod:`~sepconv.cost.report`: the schema (pydantic);
- :mod:`~sepconv.cost.graph`: the graph with shapes inferred at batch 1;
- :mod:`~sepconv.cost.layers`: one node -> one layer's counts;
- :mod:`~sepconv.cost.analysis`: separable pairs, totals, shares -> :func:`analyze_model`;
- :mod:`~sepconv.cost.profile`: ONNX Runtime's profiler mapped onto the layers;
- :mod:`~sepconv.cost.render`: Markdown and text.
"""

from sepconv.cost.analysis import analyze_model
from sepconv.cost.profile import profile_model
from sepconv.cost.render import render, render_markdown, render_text
from sepconv.cost.report import (
    DEFAULT_PROFILE_RUNS,
    MAX_PROFILE_RUNS,
    PROFILE_WARMUP_RUNS,
    CostedModel,
    CostError,
    CostReport,
    KindShare,
    KindTiming,
    LayerCost,
    LayerKind,
    LayerTiming,
    Optimization,
    ProfileReport,
    SeparablePair,
    Totals,
)

__all__ = [
    "DEFAULT_PROFILE_RUNS",
    "MAX_PROFILE_RUNS",
    "PROFILE_WARMUP_RUNS",
    "CostError",
    "CostReport",
    "CostedModel",
    "KindShare",
    "KindTiming",
    "LayerCost",
    "LayerKind",
    "LayerTiming",
    "Optimization",
    "ProfileReport",
    "SeparablePair",
    "Totals",
    "analyze_model",
    "profile_model",
    "render",
    "render_markdown",
    "render_text",
]
