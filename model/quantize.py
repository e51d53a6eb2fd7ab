"""INT8 post-training static quantization of an exported model with ONNX Runtime.

The FP32 export is shape-inferred and optimised (``quant_pre_process``), calibrated on normalised
training images (activation ranges from MinMax), and rewritten in QDQ format: ORT's CPU provider
fuses each ``DequantizeLinear -> Conv -> QuantizeLinear`` into an integer ``QLinearConv`` at load
time, so the same file runs everywhere ORT does and the graph stays readable.

The defaults below were chosen by measuring on this project's MobileNetV1 (docs/benchmark.md,
"INT8"): QDQ + uint8 activations + int8 per-channel weights, full 8-bit range (the CPUs we serve
on have VNNI, so ``reduce_range`` only costs accuracy), every Conv and the classifier quantized.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from service.spec import ModelSpec

log = logging.getLogger(__name__)

#: Images per calibration forward pass; bounds the calibrator's memory, not its result.
CALIBRATION_BATCH = 32


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds already-normalised images (N, C, H, W) to the calibrator in fixed-size batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = CALIBRATION_BATCH):
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._input_name = input_name
        self._batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self._images), self._batch_size):
            yield {self._input_name: self._images[start : start + self._batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def depthwise_conv_names(model: onnx.ModelProto) -> list[str]:
    """Names of the grouped (depthwise) Conv nodes, for excluding them from quantization."""
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1:
            names.append(node.name)
    return names


def _read_spec(model: onnx.ModelProto) -> ModelSpec:
    return ModelSpec.from_metadata({p.key: p.value for p in model.metadata_props})


def write_spec(path: Path, spec: ModelSpec) -> None:
    """Replace the sepconv metadata of an ONNX file in place (e.g. to record INT8 accuracy)."""
    model = onnx.load(path)
    del model.metadata_props[:]
    for key, value in spec.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def quantize_int8(
    fp32_path: Path,
    calibration: np.ndarray,
    out_path: Path,
    *,
    quant_format: QuantFormat = QuantFormat.QDQ,
    activation_type: QuantType = QuantType.QUInt8,
    weight_type: QuantType = QuantType.QInt8,
    per_channel: bool = True,
    reduce_range: bool = False,
    exclude_depthwise: bool = False,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
) -> Path:
    """Quantize ``fp32_path`` to INT8 calibrated on ``calibration`` and write ``out_path``.

    ``calibration`` holds normalised model inputs, float32 (N, C, H, W), exactly what the
    service feeds the model. The output carries the same :class:`ModelSpec` with
    ``precision="int8"``; ``test_accuracy`` is cleared because the FP32 figure does not
    describe the quantized model (measure it and record it with :func:`write_spec`).
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    source = onnx.load(fp32_path)
    spec = _read_spec(source)
    expected = (spec.channels, spec.input_size, spec.input_size)
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != expected or not len(calibration):
        raise ValueError(
            f"calibration must be float32 (N, {', '.join(map(str, expected))}) with N >= 1, "
            f"got shape {calibration.shape}"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sepconv-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference + ORT's basic graph optimisations, so that every tensor has
        # a known type/shape and the quantizer sees the graph ORT will actually run.
        quant_pre_process(source, prepared, skip_symbolic_shape=False)
        prepared_model = onnx.load(prepared)
        exclude = depthwise_conv_names(prepared_model) if exclude_depthwise else []
        quantize_static(
            prepared,
            Path(tmp) / "quantized.onnx",
            ArrayCalibrationReader(calibration, spec.input_name),
            quant_format=quant_format,
            activation_type=activation_type,
            weight_type=weight_type,
            per_channel=per_channel,
            reduce_range=reduce_range,
            nodes_to_exclude=exclude,
            calibrate_method=calibrate_method,
        )
        quantized = onnx.load(Path(tmp) / "quantized.onnx")
    int8_spec = spec.model_copy(update={"precision": "int8", "test_accuracy": None})
    del quantized.metadata_props[:]
    for key, value in int8_spec.to_metadata().items():
        quantized.metadata_props.add(key=key, value=value)
    quantized.producer_name = source.producer_name
    onnx.checker.check_model(quantized)
    onnx.save(quantized, out_path)
    log.info(
        "quantized %s -> %s (%d calibration images, %s, per_channel=%s, %d depthwise excluded)",
        fp32_path,
        out_path,
        len(calibration),
        quant_format.name,
        per_channel,
        len(exclude),
    )
    return out_path
