"""The measured side of the cost report: ONNX Runtime's profiler, mapped back to the layers.

Each kernel event is attributed to the graph layer it computes, so time per layer kind sits next
to its share of mult-adds (the memory-bound depthwise convs show here, not in the counts).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from sepconv.cost.analysis import analyze_model
from sepconv.cost.graph import Graph, infer_shapes, read_spec_or_none
from sepconv.cost.report import (
    DEFAULT_PROFILE_RUNS,
    MAX_PROFILE_RUNS,
    PROFILE_WARMUP_RUNS,
    CostError,
    CostReport,
    KindTiming,
    LayerTiming,
    Optimization,
    ProfileReport,
)


def _node_index(model: onnx.ModelProto, report: CostReport) -> dict[str, str]:
    """Map every node name and tensor name an ORT kernel may be named after to a layer name.

    ORT renames what it fuses: Conv+Relu becomes a FusedConv under the Conv's name, while the
    NCHWc transformer names its node after the *output* tensor (``relu_3_nchwc``). So each
    shape-preserving node on a single-consumer chain below a layer (its ReLU, BN, Q/DQ) maps to
    that layer too, and tensors map like the nodes that produce them. Pooling and reshapes
    change the shape and stay unattributed.
    """
    g = Graph(model)
    layer_names = {layer.name for layer in report.layers}
    owner: dict[str, str] = {}
    for node in g.nodes:
        name = node.name or (node.output[0] if node.output else "")
        if name in layer_names:
            owner[name] = name
            continue
        dynamic = [i for i in node.input if i and i not in g.static]
        if len(dynamic) == 1:
            parent = g.producer.get(dynamic[0])
            parent_name = parent and (parent.name or parent.output[0])
            keeps_shape = g.shapes.get(node.output[0]) == g.shapes.get(dynamic[0])
            if parent_name in owner and keeps_shape and len(g.consumers[dynamic[0]]) == 1:
                owner[name] = owner[parent_name]
    index = dict(owner)
    for node in g.nodes:
        name = node.name or (node.output[0] if node.output else "")
        if name in owner:
            for out in node.output:
                index.setdefault(out, owner[name])
    return index


def _resolve(event_name: str, index: dict[str, str]) -> str | None:
    base = event_name.removesuffix("_kernel_time")
    candidates = [base]
    # ORT transformers append a suffix to the node or output name they start from.
    for suffix in ("_nchwc", "_fused", "_token"):
        if suffix in base:
            candidates.append(base[: base.rindex(suffix)])
    for candidate in candidates:
        if candidate in index:
            return index[candidate]
    return None


_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}


def profile_model(
    path: str | Path | bytes,
    report: CostReport | None = None,
    *,
    runs: int = DEFAULT_PROFILE_RUNS,
    warmup: int = PROFILE_WARMUP_RUNS,
    intra_op_threads: int = 1,
    providers: list[str] | None = None,
    optimization: Optimization = "all",
) -> ProfileReport:
    """Time each layer kind under ONNX Runtime's profiler at batch 1.

    A private session (the serving one is never slowed by profiling) runs ``warmup + runs``
    inferences; each node's time is the median over the measured runs, so one scheduler hiccup
    does not move the table. One thread by default keeps per-kernel times additive.
    """
    import onnxruntime as ort  # the static report must not need the runtime

    if not 1 <= runs <= MAX_PROFILE_RUNS:
        raise CostError(f"runs must be between 1 and {MAX_PROFILE_RUNS}, got {runs}")
    if optimization not in _LEVELS:
        raise CostError(f"optimization must be one of {sorted(_LEVELS)}, got {optimization!r}")
    if isinstance(path, bytes):
        model = onnx.load_from_string(path)
        report = report or analyze_model(model)
    else:
        path = Path(path)
        report = report or analyze_model(path)
        model = onnx.load(str(path))
    fixed, _, _ = infer_shapes(model, report.model.input_shape[-1], read_spec_or_none(model))
    index = _node_index(fixed, report)
    layers = {layer.name: layer for layer in report.layers}

    with tempfile.TemporaryDirectory(prefix="sepconv-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
        opts.log_severity_level = 3
        session = ort.InferenceSession(
            path if isinstance(path, bytes) else str(path),
            opts,
            providers=providers or ["CPUExecutionProvider"],
        )
        rng = np.random.default_rng(0)
        feeds = {}
        for value in session.get_inputs():
            shape = next(
                [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in fixed.graph.input
                if v.name == value.name
            )
            dtype = helper.tensor_dtype_to_np_dtype(
                next(
                    v.type.tensor_type.elem_type for v in fixed.graph.input if v.name == value.name
                )
            )
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        walls = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            session.run(None, feeds)
            if i >= warmup:
                walls.append(time.perf_counter() - start)
        trace_path = session.end_profiling()
        used_providers = list(session.get_providers())
        with open(trace_path, encoding="utf-8") as fh:
            events = json.load(fh)

    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            durations[event["name"]].append(float(event["dur"]))
    per_layer: dict[str, float] = defaultdict(float)
    other_us, unmapped = 0.0, []
    for name, durs in durations.items():
        measured = durs[warmup:] or durs
        median = statistics.median(measured)
        layer = _resolve(name, index)
        if layer is None:
            other_us += median
            unmapped.append(name.removesuffix("_kernel_time"))
        else:
            per_layer[layer] += median
    kernel_us = sum(per_layer.values()) + other_us

    by_label: dict[str, float] = defaultdict(float)
    for name, us in per_layer.items():
        by_label[layers[name].label] += us
    kinds = []
    for share in report.shares:
        us = by_label.get(share.label, 0.0)
        kinds.append(
            KindTiming(
                label=share.label,
                time_ms=us / 1e3,
                time_share=us / kernel_us if kernel_us else 0.0,
                mult_adds_share=share.mult_adds_share,
                gmacs_per_s=share.mult_adds / us / 1e3 if us else 0.0,
                arithmetic_intensity=share.arithmetic_intensity,
            )
        )
    layer_rows = [
        LayerTiming(
            name=layer.name,
            label=layer.label,
            time_us=per_layer.get(layer.name, 0.0),
            gmacs_per_s=layer.mult_adds / per_layer[layer.name] / 1e3
            if per_layer.get(layer.name)
            else 0.0,
        )
        for layer in report.layers
    ]
    return ProfileReport(
        runs=runs,
        warmup=warmup,
        intra_op_threads=intra_op_threads,
        providers=used_providers,
        optimization=optimization,
        onnxruntime_version=ort.__version__,
        wall_ms_median=statistics.median(walls) * 1e3,
        kernel_ms=kernel_us / 1e3,
        other_ms=other_us / 1e3,
        unmapped_nodes=sorted(unmapped),
        kinds=kinds,
        layers=layer_rows,
    )
