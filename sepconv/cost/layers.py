"""One Conv/Gemm/MatMul node -> its :class:`LayerCost`, counted from shapes and attributes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx

from sepconv.cost.graph import CONV_OPS, MATMUL_OPS, Graph, attrs, input_at
from sepconv.cost.report import CostError, LayerCost, LayerKind


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape fields of a :class:`LayerCost`; spatial ones are None for matrix products."""

    input_channels: int
    output_channels: int
    group: int = 1
    input_h: int | None = None
    input_w: int | None = None
    kernel_h: int | None = None
    kernel_w: int | None = None
    stride_h: int | None = None
    stride_w: int | None = None
    pads: list[int] | None = None
    dilation_h: int | None = None
    dilation_w: int | None = None
    output_h: int | None = None
    output_w: int | None = None


@dataclass(frozen=True, slots=True)
class _Tensors:
    """The tensor names a layer reads and writes."""

    x: str
    weight: str
    bias: str
    y: str


def label(kind: LayerKind, kh: int | None, kw: int | None) -> str:
    """The row of the per-kind table a layer falls in (the paper's Table 2 wording)."""
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


def _conv_pads(node_attrs: dict, in_hw, out_hw, kernel, strides, dilations) -> list[int]:
    auto_pad = node_attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(node_attrs.get("pads", [0, 0, 0, 0]))
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


def conv_layer(g: Graph, node: onnx.NodeProto) -> LayerCost:
    xi, wi, bi = CONV_OPS[node.op_type]
    t = _Tensors(input_at(node, xi), input_at(node, wi), input_at(node, bi), node.output[0])
    x_shape, w_shape, y_shape = g.shape(t.x, node), g.shape(t.weight, node), g.shape(t.y, node)
    if len(x_shape) != 4:
        raise CostError(
            f"{node.op_type} node {node.name!r} is a {len(x_shape) - 2}-D convolution; "
            "only 2-D convolutions are costed"
        )
    node_attrs = attrs(node)
    _, m, h, wd = x_shape
    batch, n, ho, wo = y_shape
    group = int(node_attrs.get("group", 1))
    kh, kw = (int(k) for k in node_attrs.get("kernel_shape", w_shape[2:]))
    strides = [int(s) for s in node_attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in node_attrs.get("dilations", [1, 1])]
    pads = _conv_pads(node_attrs, (h, wd), (ho, wo), (kh, kw), strides, dilations)
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
    geometry = Geometry(
        input_channels=m,
        output_channels=n,
        group=group,
        input_h=h,
        input_w=wd,
        kernel_h=kh,
        kernel_w=kw,
        stride_h=strides[0],
        stride_w=strides[1],
        pads=pads,
        dilation_h=dilations[0],
        dilation_w=dilations[1],
        output_h=ho,
        output_w=wo,
    )
    mult_adds = batch * kh * kw * (m // group) * n * ho * wo
    return _layer(g, node, t, kind, mult_adds, geometry)


def matmul_layer(g: Graph, node: onnx.NodeProto) -> LayerCost:
    ai, bi, ci = MATMUL_OPS[node.op_type]
    t = _Tensors(input_at(node, ai), input_at(node, bi), input_at(node, ci), node.output[0])
    a_shape, b_shape = g.shape(t.x, node), g.shape(t.weight, node)
    node_attrs = attrs(node)
    if node.op_type == "Gemm":
        rows, k = a_shape[::-1] if node_attrs.get("transA", 0) else a_shape
        k_b, n = b_shape[::-1] if node_attrs.get("transB", 0) else b_shape
        mult_adds = rows * k * n
    else:
        k, n = a_shape[-1], b_shape[-1]
        k_b = b_shape[-2] if len(b_shape) > 1 else b_shape[0]
        # Every output element is one length-k dot product.
        mult_adds = g.numel(t.y, node) * k
    if k != k_b:
        raise CostError(f"{node.op_type} node {node.name!r}: inner sizes {k} and {k_b} differ")
    kind = LayerKind.FULLY_CONNECTED if t.weight in g.static else LayerKind.MATMUL
    return _layer(g, node, t, kind, mult_adds, Geometry(input_channels=k, output_channels=n))


def _layer(
    g: Graph, node: onnx.NodeProto, t: _Tensors, kind: LayerKind, mult_adds: int, geo: Geometry
) -> LayerCost:
    weight_params = g.numel(t.weight, node) if t.weight in g.static else 0
    bias_params = g.numel(t.bias, node) if t.bias and t.bias in g.static else 0
    moved = g.nbytes(t.x, node) + g.nbytes(t.y, node)
    moved += sum(g.nbytes(name, node) for name in (t.weight, t.bias) if name)
    weight_name = t.weight
    # A quantized weight reaches the layer through DequantizeLinear: name it by its initializer.
    producer = g.producer.get(t.weight)
    while producer is not None and producer.input and producer.input[0] in g.static:
        weight_name = producer.input[0]
        producer = g.producer.get(weight_name)
    return LayerCost(
        name=node.name or t.y,
        weight=weight_name,
        op_type=node.op_type,
        kind=kind,
        label=label(kind, geo.kernel_h, geo.kernel_w),
        mult_adds=mult_adds,
        weight_params=weight_params,
        bias_params=bias_params,
        params=weight_params + bias_params,
        bytes_moved=moved,
        arithmetic_intensity=mult_adds / moved if moved else 0.0,
        **dataclasses.asdict(geo),
    )
