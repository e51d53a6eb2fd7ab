"""An ONNX graph made ready for counting: batch fixed to 1, every tensor's shape inferred, and
producers, consumers and constant-ness indexed.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, shape_inference

from sepconv.cost.report import CostError
from sepconv.spec import ModelSpec, SpecError, spec_from_proto

# op type -> (activation input, weight input, bias input) positions
CONV_OPS = {"Conv": (0, 1, 2), "ConvInteger": (0, 1, None), "QLinearConv": (0, 3, 8)}
MATMUL_OPS = {
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1, None),
    "MatMulInteger": (0, 1, None),
    "QLinearMatMul": (0, 3, None),
}
LAYER_OPS = frozenset(CONV_OPS) | frozenset(MATMUL_OPS)
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
#: How far apart (in nodes) a depthwise and its pointwise may be: ReLU, BN, Q/DQ pairs...
MAX_CHAIN = 8


class Graph:
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


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def input_at(node: onnx.NodeProto, index: int | None) -> str:
    if index is None or index >= len(node.input):
        return ""
    return node.input[index]


def read_spec_or_none(model: onnx.ModelProto) -> ModelSpec | None:
    try:
        return spec_from_proto(model)
    except SpecError:
        return None  # any ONNX file can be costed; the spec only adds names and input size


def fix_inputs(
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


def infer_shapes(
    model: onnx.ModelProto, input_size: int | None, spec: ModelSpec | None
) -> tuple[onnx.ModelProto, str, list[int]]:
    """A copy of ``model`` with batch 1 and every tensor shape inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    input_name, input_shape = fix_inputs(fixed, input_size, spec)
    # Stale value_info from the exporter could hold the symbolic batch; infer afresh.
    del fixed.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(fixed, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError: the graph is inconsistent
        raise CostError(f"ONNX shape inference failed: {exc}") from exc
    return inferred, input_name, input_shape
