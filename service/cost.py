"""Exact, graph-derived compute cost of an ONNX model, and what ONNX Runtime makes of it.

The one implementation behind ``GET /v1/cost`` and ``python -m model cost``. Every count comes
from the graph itself: the batch axis is fixed to 1, ``onnx.shape_inference`` gives each tensor
its shape at the model's input size, and the mult-adds of each Conv/Gemm/MatMul follow from
those shapes and the node's attributes. Nothing is looked up in a table, so the report is right
for any width multiplier, input size or hand-made graph.

Conventions (the MobileNet paper's):

* one mult-add = one multiply-accumulate; a conv costs ``Kh*Kw*(M/group)*N*Hout*Wout`` per image,
  padded positions included (the kernel runs over them all the same);
* params = weight elements + bias elements of those layers. BatchNormalization nodes left in the
  graph are reported apart (``other_params``), and ``bn_folded`` says whether any remain;
* a *separable pair* is a depthwise conv whose output reaches a 1x1 stride-1 conv through a chain
  of single-consumer, shape-preserving nodes (ReLU, BN, Clip, Q/DQ, ...). It replaces a standard
  conv with the depthwise's kernel, stride and padding: ``Dk^2*M*N*Dp^2`` mult-adds against
  ``Dk^2*M*Dp^2 + M*N*Dp^2``, a ratio of ``1/N + 1/Dk^2``, checked exactly with fractions.

The measured side (:func:`profile_model`) runs the model under ONNX Runtime's profiler and maps
each kernel event back to the graph's layers, so time per layer kind sits next to its share of
mult-adds.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, shape_inference
from pydantic import BaseModel, ConfigDict, Field

from service.spec import ModelSpec, SpecError

#: Bounds for one profiling request: enough runs for a stable median, few enough to stay short.
DEFAULT_PROFILE_RUNS = 20
MAX_PROFILE_RUNS = 200
PROFILE_WARMUP_RUNS = 2

Optimization = Literal["all", "extended", "basic", "disabled"]


class CostError(ValueError):
    """The model cannot be costed; the message names the node or input at fault."""


class LayerKind(StrEnum):
    STANDARD = "standard"  # group 1, kernel larger than 1x1
    POINTWISE = "pointwise"  # group 1, 1x1 kernel
    DEPTHWISE = "depthwise"  # group == M input channels, N == k*M (channel multiplier k)
    GROUPED = "grouped"  # any other group > 1
    FULLY_CONNECTED = "fully_connected"  # Gemm, or MatMul by a constant matrix
    MATMUL = "matmul"  # MatMul of two activations (no parameters)


# --------------------------------------------------------------------------- report schema


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerCost(_Model):
    """One Conv/Gemm/MatMul node at batch 1. Spatial fields are null for fully connected layers."""

    name: str = Field(description="ONNX node name.")
    weight: str = Field(description="Weight tensor name (usually the framework's module path).")
    op_type: str
    kind: LayerKind
    label: str = Field(description="Row of the per-kind table, e.g. 'Conv DW 3x3'.")
    input_h: int | None
    input_w: int | None
    input_channels: int = Field(description="M: input channels (features for FC).")
    kernel_h: int | None
    kernel_w: int | None
    stride_h: int | None
    stride_w: int | None
    pads: list[int] | None = Field(description="top, left, bottom, right")
    dilation_h: int | None
    dilation_w: int | None
    group: int
    output_h: int | None
    output_w: int | None
    output_channels: int = Field(description="N: output channels (features for FC).")
    mult_adds: int
    weight_params: int
    bias_params: int
    params: int
    bytes_moved: int = Field(
        description="Input + weights + bias + output bytes: the least traffic the layer needs."
    )
    arithmetic_intensity: float = Field(description="mult_adds / bytes_moved.")


class SeparablePair(_Model):
    """A depthwise conv and the pointwise conv it feeds, against the standard conv they replace."""

    depthwise: str
    pointwise: str
    between: list[str] = Field(description="Op types on the path from depthwise to pointwise.")
    input_channels: int = Field(description="M")
    output_channels: int = Field(description="N")
    multiplier: int = Field(description="Depthwise channel multiplier (1 in MobileNet).")
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    output_h: int
    output_w: int
    standard_mult_adds: int = Field(description="Dk^2*M*N*Dp^2")
    separable_mult_adds: int = Field(description="Dk^2*M*Dp^2 + M*N*Dp^2, from the layer counts")
    standard_params: int
    separable_params: int
    ratio: float = Field(description="separable / standard mult-adds, from the counts")
    ratio_exact: str = Field(description="The same ratio as an exact fraction.")
    formula_ratio: float = Field(description="multiplier * (1/N + 1/Dk^2)")
    formula_exact: str
    agrees: bool = Field(description="ratio_exact == formula_exact, compared as fractions.")


class KindShare(_Model):
    """One row of the per-kind table (the MobileNet paper's Table 2)."""

    label: str
    kind: LayerKind
    layers: int
    mult_adds: int
    mult_adds_share: float = Field(description="Fraction of the network's mult-adds (0..1).")
    params: int
    params_share: float = Field(description="Fraction of the network's params (0..1).")
    bytes_moved: int
    arithmetic_intensity: float = Field(description="mult-adds per byte moved.")


class Totals(_Model):
    mult_adds: int
    params: int = Field(description="Weights + biases of all Conv/Gemm/MatMul layers.")
    other_params: int = Field(
        description="Float constants outside those layers (e.g. unfolded BatchNormalization)."
    )
    bn_folded: bool = Field(description="True iff no BatchNormalization node remains.")
    batchnorm_nodes: int
    full_conv_mult_adds: int = Field(
        description="The same network with every separable pair replaced by a standard conv."
    )
    full_conv_params: int
    mult_adds_reduction: float = Field(description="full_conv_mult_adds / mult_adds")
    params_reduction: float = Field(description="full_conv_params / params")


class ModelInfo(_Model):
    path: str
    name: str | None = None
    version: str | None = None
    alpha: float | None = None
    precision: str | None = None
    input_name: str
    input_shape: list[int] = Field(description="The shape the counts are for (batch fixed to 1).")
    opset: int
    nodes: int


class KindTiming(_Model):
    label: str
    time_ms: float = Field(description="Median kernel time per inference, summed over layers.")
    time_share: float = Field(description="Fraction of all kernel time (0..1).")
    mult_adds_share: float
    gmacs_per_s: float = Field(description="Achieved giga mult-adds per second.")
    arithmetic_intensity: float = Field(description="mult-adds per byte moved (static).")


class LayerTiming(_Model):
    name: str
    label: str
    time_us: float
    gmacs_per_s: float


class ProfileReport(_Model):
    runs: int
    warmup: int
    intra_op_threads: int
    providers: list[str]
    optimization: Optimization
    onnxruntime_version: str
    wall_ms_median: float = Field(description="Median session.run() wall time at batch 1.")
    kernel_ms: float = Field(description="Sum of the median kernel times of every node.")
    other_ms: float = Field(description="Kernel time not attributable to a counted layer.")
    unmapped_nodes: list[str] = Field(description="Profiled nodes that map to no counted layer.")
    kinds: list[KindTiming]
    layers: list[LayerTiming]


class CostReport(_Model):
    model: ModelInfo
    layers: list[LayerCost]
    separable_pairs: list[SeparablePair]
    totals: Totals
    shares: list[KindShare]
    profile: ProfileReport | None = None


# --------------------------------------------------------------------------- graph analysis

# op type -> (activation input, weight input, bias input) positions
_CONV_OPS = {"Conv": (0, 1, 2), "ConvInteger": (0, 1, None), "QLinearConv": (0, 3, 8)}
_MATMUL_OPS = {
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1, None),
    "MatMulInteger": (0, 1, None),
    "QLinearMatMul": (0, 3, None),
}
LAYER_OPS = frozenset(_CONV_OPS) | frozenset(_MATMUL_OPS)
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
#: How far apart (in nodes) a depthwise and its pointwise may be: ReLU, BN, Q/DQ pairs...
_MAX_CHAIN = 8


class _Graph:
    """Shapes, element sizes, producers/consumers and constant-ness of every tensor."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.itemsize: dict[str, int] = {}
        self.elem_type: dict[str, int] = {}
        for value in [*graph.input, *graph.value_info, *graph.output]:
            ttype = value.type.tensor_type
            if not ttype.HasField("shape"):
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
            self.shapes[value.name] = dims
            self._set_type(value.name, ttype.elem_type)
        self.initializers = {init.name: init for init in graph.initializer}
        for init in graph.initializer:
            self.shapes[init.name] = tuple(init.dims)
            self._set_type(init.name, init.data_type)
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        # Constant-ness propagates through nodes fed only by constants (e.g. the
        # DequantizeLinear in front of an int8 weight), so quantized weights count as params.
        graph_inputs = {i.name for i in graph.input} - set(self.initializers)
        self.static: set[str] = set(self.initializers)
        for node in self.nodes:
            ins = [i for i in node.input if i]
            if node.op_type == "Constant" or (
                ins and all(i in self.static for i in ins) and not graph_inputs & set(ins)
            ):
                self.static.update(node.output)

    def _set_type(self, name: str, elem_type: int) -> None:
        self.elem_type[name] = elem_type
        if elem_type:
            self.itemsize[name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize

    def shape(self, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
        shape = self.shapes.get(name)
        if shape is None or any(d < 0 for d in shape):
            raise CostError(
                f"shape inference left tensor {name!r} (used by {node.op_type} node "
                f"{node.name!r}) without a static shape: {shape}"
            )
        return shape

    def numel(self, name: str, node: onnx.NodeProto) -> int:
        return math.prod(self.shape(name, node))

    def nbytes(self, name: str, node: onnx.NodeProto) -> int:
        return self.numel(name, node) * self.itemsize.get(name, 4)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input(node: onnx.NodeProto, index: int | None) -> str:
    if index is None or index >= len(node.input):
        return ""
    return node.input[index]


def _label(kind: LayerKind, kh: int | None, kw: int | None) -> str:
    match kind:
        case LayerKind.DEPTHWISE:
            return f"Conv DW {kh}x{kw}"
        case LayerKind.GROUPED:
            return f"Conv grouped {kh}x{kw}"
        case LayerKind.FULLY_CONNECTED:
            return "Fully connected"
        case LayerKind.MATMUL:
            return "MatMul"
        case _:
            return f"Conv {kh}x{kw}"


def _conv_pads(attrs: dict, in_hw, out_hw, kernel, strides, dilations) -> list[int]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return [pads[0], pads[1], pads[2], pads[3]]
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    begin, end = [], []
    for i in range(2):
        total = max((out_hw[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_hw[i], 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return [begin[0], begin[1], end[0], end[1]]


def _conv_layer(g: _Graph, node: onnx.NodeProto) -> LayerCost:
    xi, wi, bi = _CONV_OPS[node.op_type]
    x, w, y = _input(node, xi), _input(node, wi), node.output[0]
    x_shape, w_shape, y_shape = g.shape(x, node), g.shape(w, node), g.shape(y, node)
    if len(x_shape) != 4:
        raise CostError(
            f"{node.op_type} node {node.name!r} is a {len(x_shape) - 2}-D convolution; "
            "only 2-D convolutions are costed"
        )
    attrs = _attrs(node)
    _, m, h, wd = x_shape
    batch, n, ho, wo = y_shape
    group = int(attrs.get("group", 1))
    kh, kw = (int(k) for k in attrs.get("kernel_shape", w_shape[2:]))
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    pads = _conv_pads(attrs, (h, wd), (ho, wo), (kh, kw), strides, dilations)
    if w_shape != (n, m // group, kh, kw) or m % group:
        raise CostError(
            f"{node.op_type} node {node.name!r}: weight shape {w_shape} does not fit input "
            f"channels {m}, group {group}, output channels {n}"
        )
    if group == 1:
        kind = LayerKind.POINTWISE if (kh, kw) == (1, 1) else LayerKind.STANDARD
    elif group == m and n % m == 0:
        kind = LayerKind.DEPTHWISE
    else:
        kind = LayerKind.GROUPED
    mult_adds = batch * kh * kw * (m // group) * n * ho * wo
    return _layer(
        g,
        node,
        x,
        w,
        _input(node, bi),
        y,
        kind,
        mult_adds,
        kh=kh,
        kw=kw,
        extra={
            "input_h": h,
            "input_w": wd,
            "input_channels": m,
            "kernel_h": kh,
            "kernel_w": kw,
            "stride_h": strides[0],
            "stride_w": strides[1],
            "pads": pads,
            "dilation_h": dilations[0],
            "dilation_w": dilations[1],
            "group": group,
            "output_h": ho,
            "output_w": wo,
            "output_channels": n,
        },
    )


def _matmul_layer(g: _Graph, node: onnx.NodeProto) -> LayerCost:
    ai, bi_, ci = _MATMUL_OPS[node.op_type]
    a, b, y = _input(node, ai), _input(node, bi_), node.output[0]
    a_shape, b_shape = g.shape(a, node), g.shape(b, node)
    attrs = _attrs(node)
    if node.op_type == "Gemm":
        rows, k = a_shape[::-1] if attrs.get("transA", 0) else a_shape
        k_b, n = b_shape[::-1] if attrs.get("transB", 0) else b_shape
        mult_adds = rows * k * n
    else:
        k, n = a_shape[-1], b_shape[-1]
        k_b = b_shape[-2] if len(b_shape) > 1 else b_shape[0]
        # Every output element is one length-k dot product.
        mult_adds = g.numel(y, node) * k
    if k != k_b:
        raise CostError(f"{node.op_type} node {node.name!r}: inner sizes {k} and {k_b} differ")
    kind = LayerKind.FULLY_CONNECTED if b in g.static else LayerKind.MATMUL
    bias = _input(node, ci)
    return _layer(
        g,
        node,
        a,
        b,
        bias,
        y,
        kind,
        mult_adds,
        kh=None,
        kw=None,
        extra={
            "input_h": None,
            "input_w": None,
            "input_channels": k,
            "kernel_h": None,
            "kernel_w": None,
            "stride_h": None,
            "stride_w": None,
            "pads": None,
            "dilation_h": None,
            "dilation_w": None,
            "group": 1,
            "output_h": None,
            "output_w": None,
            "output_channels": n,
        },
    )


def _layer(g, node, x, w, bias, y, kind, mult_adds, *, kh, kw, extra) -> LayerCost:
    weight_params = g.numel(w, node) if w in g.static else 0
    bias_params = g.numel(bias, node) if bias and bias in g.static else 0
    moved = g.nbytes(x, node) + g.nbytes(y, node)
    moved += sum(g.nbytes(t, node) for t in (w, bias) if t)
    weight_name = w
    # A quantized weight reaches the layer through DequantizeLinear: name it by its initializer.
    producer = g.producer.get(w)
    while producer is not None and producer.input and producer.input[0] in g.static:
        weight_name = producer.input[0]
        producer = g.producer.get(weight_name)
    return LayerCost(
        name=node.name or y,
        weight=weight_name,
        op_type=node.op_type,
        kind=kind,
        label=_label(kind, kh, kw),
        mult_adds=mult_adds,
        weight_params=weight_params,
        bias_params=bias_params,
        params=weight_params + bias_params,
        bytes_moved=moved,
        arithmetic_intensity=mult_adds / moved if moved else 0.0,
        **extra,
    )


def _find_pointwise(
    g: _Graph, dw_node: onnx.NodeProto, layers: dict[str, LayerCost]
) -> tuple[onnx.NodeProto, list[str]] | None:
    """Follow the depthwise output through single-consumer, shape-preserving nodes to a 1x1."""
    tensor, between = dw_node.output[0], []
    for _ in range(_MAX_CHAIN):
        consumers = g.consumers.get(tensor, [])
        if len(consumers) != 1 or tensor in g.outputs:
            return None
        node = consumers[0]
        if node.op_type in LAYER_OPS:
            layer = layers[node.name or node.output[0]]
            is_pointwise = (
                layer.kind == LayerKind.POINTWISE
                and (layer.stride_h, layer.stride_w) == (1, 1)
                and layer.pads == [0, 0, 0, 0]
                and _input(node, _CONV_OPS.get(node.op_type, (0,))[0]) == tensor
            )
            return (node, between) if is_pointwise else None
        dynamic = [i for i in node.input if i and i not in g.static]
        if dynamic != [tensor] or g.shapes.get(node.output[0]) != g.shapes.get(tensor):
            return None
        between.append(node.op_type)
        tensor = node.output[0]
    return None


def _fraction(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def _pairs(g: _Graph, layers: dict[str, LayerCost]) -> list[SeparablePair]:
    pairs = []
    for node in g.nodes:
        key = node.name or (node.output[0] if node.output else "")
        dw = layers.get(key)
        if dw is None or dw.kind != LayerKind.DEPTHWISE:
            continue
        found = _find_pointwise(g, node, layers)
        if found is None:
            continue
        pw_node, between = found
        pw = layers[pw_node.name or pw_node.output[0]]
        m, n = dw.input_channels, pw.output_channels
        kk = dw.kernel_h * dw.kernel_w
        multiplier = dw.output_channels // m
        standard = kk * m * n * dw.output_h * dw.output_w
        separable = dw.mult_adds + pw.mult_adds
        ratio = Fraction(separable, standard)
        formula = multiplier * (Fraction(1, n) + Fraction(1, kk))
        pairs.append(
            SeparablePair(
                depthwise=dw.name,
                pointwise=pw.name,
                between=between,
                input_channels=m,
                output_channels=n,
                multiplier=multiplier,
                kernel_h=dw.kernel_h,
                kernel_w=dw.kernel_w,
                stride_h=dw.stride_h,
                stride_w=dw.stride_w,
                output_h=dw.output_h,
                output_w=dw.output_w,
                standard_mult_adds=standard,
                separable_mult_adds=separable,
                # The replacing conv keeps the pointwise's bias: BN after it would fold the same.
                standard_params=kk * m * n + (n if pw.bias_params else 0),
                separable_params=dw.params + pw.params,
                ratio=float(ratio),
                ratio_exact=_fraction(ratio),
                formula_ratio=float(formula),
                formula_exact=_fraction(formula),
                agrees=ratio == formula,
            )
        )
    return pairs


def _shares(layers: list[LayerCost], total_macs: int, total_params: int) -> list[KindShare]:
    groups: dict[str, list[LayerCost]] = defaultdict(list)
    for layer in layers:
        groups[layer.label].append(layer)
    rows = []
    for label, members in groups.items():
        macs = sum(m.mult_adds for m in members)
        params = sum(m.params for m in members)
        moved = sum(m.bytes_moved for m in members)
        rows.append(
            KindShare(
                label=label,
                kind=members[0].kind,
                layers=len(members),
                mult_adds=macs,
                mult_adds_share=macs / total_macs if total_macs else 0.0,
                params=params,
                params_share=params / total_params if total_params else 0.0,
                bytes_moved=moved,
                arithmetic_intensity=macs / moved if moved else 0.0,
            )
        )
    return sorted(rows, key=lambda r: (-r.mult_adds, r.label))


def _read_spec(model: onnx.ModelProto) -> ModelSpec | None:
    try:
        return ModelSpec.from_metadata({p.key: p.value for p in model.metadata_props})
    except SpecError:
        return None  # any ONNX file can be costed; the spec only adds names and input size


def _fix_inputs(
    model: onnx.ModelProto, input_size: int | None, spec: ModelSpec | None
) -> tuple[str, list[int]]:
    """Pin the batch axis to 1 and any symbolic spatial axis to the input size, in place."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if not inputs:
        raise CostError("the graph has no inputs")
    size = input_size or (spec.input_size if spec else None)
    first: tuple[str, list[int]] | None = None
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        fixed = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                fixed.append(dim.dim_value)
                continue
            if axis == 0:
                dim.dim_value = 1
            elif size is not None and len(dims) == 4 and axis >= 2:
                dim.dim_value = size
            else:
                raise CostError(
                    f"input {value.name!r} axis {axis} is symbolic ({dim.dim_param!r}); "
                    "give the input size explicitly"
                )
            fixed.append(dim.dim_value)
        if first is None:
            first = (value.name, fixed)
    assert first is not None
    return first


def _infer(
    model: onnx.ModelProto, input_size: int | None, spec: ModelSpec | None
) -> tuple[onnx.ModelProto, str, list[int]]:
    """A copy of ``model`` with batch 1 and every tensor shape inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    input_name, input_shape = _fix_inputs(fixed, input_size, spec)
    # Stale value_info from the exporter could hold the symbolic batch; infer afresh.
    del fixed.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError: the graph is inconsistent
        raise CostError(f"ONNX shape inference failed: {exc}") from exc
    return inferred, input_name, input_shape


def analyze_model(
    model: onnx.ModelProto | str | Path, *, input_size: int | None = None, path: str = ""
) -> CostReport:
    """The static cost report: per-layer counts, separable pairs, totals and per-kind shares.

    ``input_size`` is needed only when the graph's spatial axes are symbolic and the file carries
    no sepconv metadata. The caller's ``model`` is not modified.
    """
    if not isinstance(model, onnx.ModelProto):
        path = path or str(model)
        try:
            model = onnx.load(str(model))
        except FileNotFoundError:
            raise
        except Exception as exc:  # protobuf DecodeError and friends for a corrupt file
            raise CostError(f"{model} is not a readable ONNX model: {exc}") from exc
    spec = _read_spec(model)
    inferred, input_name, input_shape = _infer(model, input_size, spec)
    g = _Graph(inferred)

    layers: dict[str, LayerCost] = {}
    for node in g.nodes:
        if node.op_type in _CONV_OPS:
            layer = _conv_layer(g, node)
        elif node.op_type in _MATMUL_OPS:
            layer = _matmul_layer(g, node)
        else:
            continue
        if layer.name in layers:
            raise CostError(f"two layers share the node name {layer.name!r}")
        layers[layer.name] = layer
    if not layers:
        raise CostError("the graph has no Conv, Gemm or MatMul node to cost")
    ordered = list(layers.values())
    pairs = _pairs(g, layers)

    mult_adds = sum(layer.mult_adds for layer in ordered)
    params = sum(layer.params for layer in ordered)
    layer_tensors = set()
    for node in g.nodes:
        if node.op_type in LAYER_OPS:
            layer_tensors.update(node.input)
    # Walk each layer weight back through its Q/DQ chain so an int8 weight is not counted twice.
    frontier = [t for t in layer_tensors if t in g.static]
    while frontier:
        producer = g.producer.get(frontier.pop())
        if producer is not None:
            fresh = [i for i in producer.input if i and i not in layer_tensors]
            layer_tensors.update(fresh)
            frontier.extend(fresh)
    other_params = sum(
        math.prod(init.dims)
        for name, init in g.initializers.items()
        if name not in layer_tensors
        and init.data_type in _FLOAT_TYPES
        and len(init.dims) >= 1
        and any(node.op_type == "BatchNormalization" for node in g.consumers.get(name, []))
    )
    bn_nodes = sum(1 for node in g.nodes if node.op_type == "BatchNormalization")
    full_macs = mult_adds + sum(p.standard_mult_adds - p.separable_mult_adds for p in pairs)
    full_params = params + sum(p.standard_params - p.separable_params for p in pairs)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return CostReport(
        model=ModelInfo(
            path=path,
            name=spec.name if spec else None,
            version=spec.version if spec else None,
            alpha=spec.alpha if spec else None,
            precision=spec.precision if spec else None,
            input_name=input_name,
            input_shape=input_shape,
            opset=opset,
            nodes=len(g.nodes),
        ),
        layers=ordered,
        separable_pairs=pairs,
        totals=Totals(
            mult_adds=mult_adds,
            params=params,
            other_params=other_params,
            bn_folded=bn_nodes == 0,
            batchnorm_nodes=bn_nodes,
            full_conv_mult_adds=full_macs,
            full_conv_params=full_params,
            mult_adds_reduction=full_macs / mult_adds if mult_adds else 0.0,
            params_reduction=full_params / params if params else 0.0,
        ),
        shares=_shares(ordered, mult_adds, params),
    )


# --------------------------------------------------------------------------- profiling


def _node_index(model: onnx.ModelProto, report: CostReport) -> dict[str, str]:
    """Map every node name and tensor name an ORT kernel may be named after to a layer name.

    ORT renames what it fuses: Conv+Relu becomes a FusedConv under the Conv's name, while the
    NCHWc transformer names its node after the *output* tensor (``relu_3_nchwc``). So each
    shape-preserving node on a single-consumer chain below a layer (its ReLU, BN, Q/DQ) maps to
    that layer too, and tensors map like the nodes that produce them. Pooling and reshapes
    change the shape and stay unattributed.
    """
    g = _Graph(model)
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
    fixed, _, _ = _infer(model, report.model.input_shape[-1], _read_spec(model))
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


# --------------------------------------------------------------------------- rendering


def _m(value: int) -> str:
    """Millions with two decimals: how the paper prints mult-adds and params."""
    return f"{value / 1e6:,.2f}M"


def _pct(value: float) -> str:
    return f"{value * 100:.2f}%"


def _layer_shape(layer: LayerCost, side: Literal["input", "output"]) -> str:
    channels = layer.input_channels if side == "input" else layer.output_channels
    h = layer.input_h if side == "input" else layer.output_h
    w = layer.input_w if side == "input" else layer.output_w
    return f"{h}x{w}x{channels}" if h is not None else f"{channels}"


def _sections(report: CostReport) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
    """(title, paragraphs, headers, rows) for every table; the renderers only lay them out."""
    t = report.totals
    model = report.model
    who = f"{model.name} v{model.version}" if model.name else Path(model.path).name or "model"
    summary = [
        f"{who}: input {'x'.join(map(str, model.input_shape))} (batch 1), "
        f"{len(report.layers)} Conv/Gemm/MatMul layers, opset {model.opset}.",
        f"Total: {t.mult_adds:,} mult-adds ({_m(t.mult_adds)}), {t.params:,} params "
        f"({_m(t.params)}); BN folded: {'yes' if t.bn_folded else 'no'} "
        f"({t.batchnorm_nodes} BatchNormalization nodes"
        + (f", {t.other_params:,} BN params not counted above" if t.other_params else "")
        + ").",
        f"With every separable pair replaced by a standard conv: {t.full_conv_mult_adds:,} "
        f"mult-adds ({_m(t.full_conv_mult_adds)}, {t.mult_adds_reduction:.2f}x more), "
        f"{t.full_conv_params:,} params ({_m(t.full_conv_params)}, "
        f"{t.params_reduction:.2f}x more).",
    ]
    sections = [("Cost report", summary, [], [])]

    share_rows = [
        [
            s.label,
            str(s.layers),
            f"{s.mult_adds:,}",
            _pct(s.mult_adds_share),
            f"{s.params:,}",
            _pct(s.params_share),
            f"{s.arithmetic_intensity:.1f}",
        ]
        for s in report.shares
    ]
    sections.append(
        (
            "Share per layer kind",
            ["Mult-adds and parameters per layer kind (the MobileNet paper's Table 2)."],
            ["Kind", "Layers", "Mult-adds", "Share", "Params", "Share", "MAC/byte"],
            share_rows,
        )
    )

    pair_rows = [
        [
            f"{p.depthwise} + {p.pointwise}",
            f"{p.kernel_h}x{p.kernel_w}/"
            + (f"{p.stride_h}" if p.stride_h == p.stride_w else f"{p.stride_h}x{p.stride_w}"),
            str(p.input_channels),
            str(p.output_channels),
            f"{p.output_h}x{p.output_w}",
            f"{p.standard_mult_adds:,}",
            f"{p.separable_mult_adds:,}",
            f"{p.ratio:.5f} ({p.ratio_exact})",
            f"{p.formula_ratio:.5f} ({p.formula_exact})",
            "yes" if p.agrees else "NO",
        ]
        for p in report.separable_pairs
    ]
    if pair_rows:
        sections.append(
            (
                "Separable pairs",
                [
                    "Standard conv Dk^2*M*N*Dp^2 against depthwise + pointwise "
                    "Dk^2*M*Dp^2 + M*N*Dp^2; the ratio from the counts must equal "
                    "1/N + 1/Dk^2 exactly."
                ],
                [
                    "Depthwise + pointwise",
                    "Dk/s",
                    "M",
                    "N",
                    "Dp",
                    "Standard",
                    "Separable",
                    "Ratio (counts)",
                    "1/N + 1/Dk^2",
                    "Equal",
                ],
                pair_rows,
            )
        )

    layer_rows = [
        [
            layer.name,
            layer.weight,
            layer.label,
            _layer_shape(layer, "input"),
            f"{layer.kernel_h}x{layer.kernel_w}" if layer.kernel_h else "-",
            f"{layer.stride_h}x{layer.stride_w}" if layer.stride_h else "-",
            ",".join(map(str, layer.pads)) if layer.pads else "-",
            _layer_shape(layer, "output"),
            f"{layer.mult_adds:,}",
            f"{layer.params:,}",
        ]
        for layer in report.layers
    ]
    sections.append(
        (
            "Layers",
            ["Input and output are HxWxC at batch 1; pads are top,left,bottom,right."],
            [
                "Node",
                "Weight",
                "Kind",
                "Input",
                "Kernel",
                "Stride",
                "Pads",
                "Output",
                "Mult-adds",
                "Params",
            ],
            layer_rows,
        )
    )

    if report.profile is not None:
        p = report.profile
        timing_rows = [
            [
                k.label,
                f"{k.time_ms:.3f}",
                _pct(k.time_share),
                _pct(k.mult_adds_share),
                f"{k.gmacs_per_s:.2f}",
                f"{k.arithmetic_intensity:.1f}",
            ]
            for k in p.kinds
        ]
        timing_rows.append(
            [
                "other (pool, reshape, reorder)",
                f"{p.other_ms:.3f}",
                _pct(p.other_ms / p.kernel_ms if p.kernel_ms else 0.0),
                "-",
                "-",
                "-",
            ]
        )
        notes = [
            f"ONNX Runtime {p.onnxruntime_version} on {', '.join(p.providers)}, optimization "
            f"{p.optimization}, {p.intra_op_threads} intra-op thread(s), median of {p.runs} "
            f"runs after {p.warmup} warm-up: {p.wall_ms_median:.3f} ms per image wall, "
            f"{p.kernel_ms:.3f} ms in kernels."
        ]
        notes.extend(_memory_bound_note(p))
        sections.append(
            (
                "Measured (ONNX Runtime profile)",
                notes,
                ["Kind", "ms", "Time share", "Mult-add share", "GMAC/s", "MAC/byte"],
                timing_rows,
            )
        )
    return sections


def _memory_bound_note(profile: ProfileReport) -> list[str]:
    """Theory against practice in a sentence, worded from the measured numbers."""
    timed = [k for k in profile.kinds if k.time_ms > 0 and k.gmacs_per_s > 0]
    dw = [k for k in timed if k.label.startswith("Conv DW")]
    dense = [k for k in timed if not k.label.startswith("Conv DW")]
    if not dw or not dense:
        return []
    d = max(dw, key=lambda k: k.time_share)
    # The pointwise convs are the natural yardstick: they do most of the work.
    ref = max(dense, key=lambda k: k.mult_adds_share)
    head = (
        f"{d.label} does {_pct(d.mult_adds_share)} of the mult-adds and takes "
        f"{_pct(d.time_share)} of the kernel time: {d.gmacs_per_s:.2f} GMAC/s against "
        f"{ref.gmacs_per_s:.2f} GMAC/s for {ref.label}"
    )
    intensity = (
        f"{d.arithmetic_intensity:.1f} mult-adds per byte moved against "
        f"{ref.arithmetic_intensity:.1f}"
    )
    if d.gmacs_per_s < ref.gmacs_per_s:
        return [
            f"{head}, {ref.gmacs_per_s / d.gmacs_per_s:.1f}x slower per mult-add. At "
            f"{intensity}, it is bound by memory traffic, not arithmetic."
        ]
    return [f"{head}; at {intensity} this runtime still keeps it as busy per mult-add."]


def render_markdown(report: CostReport) -> str:
    out = []
    for title, paragraphs, headers, rows in _sections(report):
        out.append(f"### {title}\n")
        out.extend(f"{p}\n" for p in paragraphs)
        if headers:
            out.append("| " + " | ".join(headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_text(report: CostReport) -> str:
    out = []
    for title, paragraphs, headers, rows in _sections(report):
        out.append(title)
        out.append("=" * len(title))
        out.extend(paragraphs)
        if headers:
            widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
            out.append("")
            out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
            out.append("  ".join("-" * w for w in widths))
            for row in rows:
                out.append(
                    "  ".join(
                        c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))
                    )
                )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render(report: CostReport, fmt: Literal["json", "markdown", "text"]) -> str:
    if fmt == "json":
        return report.model_dump_json(indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(report)
    return render_text(report)
