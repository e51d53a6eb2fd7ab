"""The static cost report of an ONNX graph: every layer counted, separable pairs found and
checked against the paper's formula, totals and per-kind shares.

Conventions (the MobileNet paper's):

* one mult-add = one multiply-accumulate; a conv costs ``Kh*Kw*(M/group)*N*Hout*Wout`` per image,
  padded positions included (the kernel runs over them all the same);
* params = weight elements + bias elements of those layers. BatchNormalization nodes left in the
  graph are reported apart (``other_params``), and ``bn_folded`` says whether any remain;
* a *separable pair* is a depthwise conv whose output reaches a 1x1 stride-1 conv through a chain
  of single-consumer, shape-preserving nodes (ReLU, BN, Clip, Q/DQ, ...). It replaces a standard
  conv with the depthwise's kernel, stride and padding: ``Dk^2*M*N*Dp^2`` mult-adds against
  ``Dk^2*M*Dp^2 + M*N*Dp^2``, a ratio of ``1/N + 1/Dk^2``, checked exactly with fractions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import onnx

from sepconv.cost.graph import (
    CONV_OPS,
    FLOAT_TYPES,
    LAYER_OPS,
    MATMUL_OPS,
    MAX_CHAIN,
    Graph,
    infer_shapes,
    input_at,
    read_spec_or_none,
)
from sepconv.cost.layers import conv_layer, matmul_layer
from sepconv.cost.report import (
    CostedModel,
    CostError,
    CostReport,
    KindShare,
    LayerCost,
    LayerKind,
    SeparablePair,
    Totals,
)


def _find_pointwise(
    g: Graph, dw_node: onnx.NodeProto, layers: dict[str, LayerCost]
) -> tuple[onnx.NodeProto, list[str]] | None:
    """Follow the depthwise output through single-consumer, shape-preserving nodes to a 1x1."""
    tensor, between = dw_node.output[0], []
    for _ in range(MAX_CHAIN):
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
                and input_at(node, CONV_OPS.get(node.op_type, (0,))[0]) == tensor
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


def _pairs(g: Graph, layers: dict[str, LayerCost]) -> list[SeparablePair]:
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
    spec = read_spec_or_none(model)
    inferred, input_name, input_shape = infer_shapes(model, input_size, spec)
    g = Graph(inferred)

    layers: dict[str, LayerCost] = {}
    for node in g.nodes:
        if node.op_type in CONV_OPS:
            layer = conv_layer(g, node)
        elif node.op_type in MATMUL_OPS:
            layer = matmul_layer(g, node)
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
        and init.data_type in FLOAT_TYPES
        and len(init.dims) >= 1
        and any(node.op_type == "BatchNormalization" for node in g.consumers.get(name, []))
    )
    bn_nodes = sum(1 for node in g.nodes if node.op_type == "BatchNormalization")
    full_macs = mult_adds + sum(p.standard_mult_adds - p.separable_mult_adds for p in pairs)
    full_params = params + sum(p.standard_params - p.separable_params for p in pairs)

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return CostReport(
        model=CostedModel(
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
