"""Export a trained network to ONNX, and save a graph with its :class:`~sepconv.spec.ModelSpec`.

Exporting and saving are apart so the build can verify the graph in memory (ONNX Runtime loads
bytes) and write the file, metadata included, exactly once when every figure is known.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import onnx
import torch
from torch import nn

from sepconv.spec import ModelSpec, save_model

log = logging.getLogger(__name__)

#: Pinned so an export reads the same in every ONNX Runtime the service supports.
OPSET = 18
#: Loggers the exporter talks through: torch.onnx warns about every absent torchvision op, and
#: the onnxscript optimiser logs each pass at INFO.
_CHATTY_LOGGERS = {
    "torch.onnx": logging.ERROR,
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = {name: logging.getLogger(name) for name in _CHATTY_LOGGERS}
    saved = {name: lg.level for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.setLevel(max(_CHATTY_LOGGERS[name], lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(saved[name])


def with_build_info(spec: ModelSpec) -> ModelSpec:
    """The spec with the build-time fields filled in: opset, torch version, build date."""
    return spec.model_copy(
        update={
            "onnx_opset": OPSET,
            "torch_version": torch.__version__,
            "build_date": spec.build_date or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )


def export_graph(net: nn.Module, spec: ModelSpec) -> onnx.ModelProto:
    """``net`` (eval mode, BN folded into the convs) as an ONNX graph with a dynamic batch axis.

    The graph carries no sepconv metadata yet: :func:`save_model` writes it with the file.
    """
    was_training = net.training
    net = net.eval().cpu()
    example = torch.zeros(2, spec.channels, spec.input_size, spec.input_size)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
            warnings.simplefilter("ignore")  # the exporter is chatty about internals we do not use
            program = torch.onnx.export(
                net,
                (example,),
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=OPSET,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    finally:
        net.train(was_training)
    proto = program.model_proto
    # Rename the symbolic batch dim so clients see "batch", not an exporter-generated name.
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "batch"
    del proto.metadata_props[:]
    proto.producer_name = "sepconv-serve"
    _name_layers(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(net: nn.Module, spec: ModelSpec, path: str | Path) -> Path:
    """Export and save in one step, for callers that measure nothing in between."""
    spec = with_build_info(spec)
    path = save_model(export_graph(net, spec), spec, path)
    log.info("exported %s (%s, opset %d)", path, spec.name, OPSET)
    return path


def _name_layers(proto: onnx.ModelProto) -> None:
    """Give the compute nodes the paper's layer names (``stem``, ``block3.depthwise``, ...;
    ``block3.conv`` for the standard-conv variant).

    The exporter calls them ``node_Conv_392``; the cost report and ORT profiles show node
    names, so they should say which layer of Table 1 they are. Names are assigned in graph
    order; a graph that is not a plain MobileNetV1 chain keeps the exporter's names.
    """
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    if len(gemms) != 1 or not convs or groups[0] != 1:
        return
    if len(convs) > 1 and all(g == 1 for g in groups):
        # --conv standard: stem, then one full conv per block
        convs[0].name = "stem"
        for block, conv in enumerate(convs[1:], start=1):
            conv.name = f"block{block}.conv"
        gemms[0].name = "classifier"
        return
    # stem, then (depthwise, pointwise) per block, then the classifier
    if len(convs) % 2 != 1:
        return
    pairs = list(zip(groups[1::2], groups[2::2], strict=True))
    if not all(dw > 1 and pw == 1 for dw, pw in pairs):
        return
    convs[0].name = "stem"
    for block, (dw, pw) in enumerate(zip(convs[1::2], convs[2::2], strict=True), start=1):
        dw.name = f"block{block}.depthwise"
        pw.name = f"block{block}.pointwise"
    gemms[0].name = "classifier"
