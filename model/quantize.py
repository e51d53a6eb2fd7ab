"""INT8 post-training static quantization of an exported model with ONNX Runtime.

The FP32 export is shape-inferred and optimised (``quant_pre_process``), calibrated on normalised
training images (activation ranges from MinMax), and rewritten in QDQ format: ORT's CPU provider
fuses each ``DequantizeLinear -> Conv -> QuantizeLinear`` into an integer ``QLinearConv`` at load
time, so the same file runs everywhere ORT does and the graph stays readable.

The defaults below were chosen by measuring on this project's MobileNetV1 (docs/benchmarks.md,
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

from sepconv.spec import ModelSpec, save_model, spec_from_proto

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


def quantize_graph(
    source: onnx.ModelProto, spec: ModelSpec, calibration: np.ndarray
) -> onnx.ModelProto:
    """The INT8 graph of ``source``, calibrated on ``calibration``; no metadata yet.

    ``calibration`` holds normalised model inputs, float32 (N, C, H, W), exactly what the
    service feeds the model. Settings are the measured ones in the module docstring: QDQ,
    uint8 activations, int8 per-channel weights, full range, MinMax ranges, every layer.
    """
    expected = (spec.channels, spec.input_size, spec.input_size)
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != expected or not len(calibration):
        raise ValueError(
            f"calibration must be float32 (N, {', '.join(map(str, expected))}) with N >= 1, "
            f"got shape {calibration.shape}"
        )
    with tempfile.TemporaryDirectory(prefix="sepconv-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference + ORT's basic graph optimisations, so that every tensor has
        # a known type/shape and the quantizer sees the graph ORT will actually run.
        quant_pre_process(source, prepared, skip_symbolic_shape=False)
        quantize_static(
            prepared,
            Path(tmp) / "quantized.onnx",
            ArrayCalibrationReader(calibration, spec.input_name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=False,
            calibrate_method=CalibrationMethod.MinMax,
        )
        quantized = onnx.load(Path(tmp) / "quantized.onnx")
    quantized.producer_name = source.producer_name
    log.info("quantized %s to INT8 (%d calibration images)", spec.name, len(calibration))
    return quantized


def int8_spec(spec: ModelSpec, test_accuracy: float | None = None) -> ModelSpec:
    """The INT8 model's spec: the FP32 accuracy does not describe it, so only a measured one."""
    return spec.model_copy(update={"precision": "int8", "test_accuracy": test_accuracy})


def quantize_int8(fp32_path: Path, calibration: np.ndarray, out_path: Path) -> Path:
    """Quantize the file ``fp32_path`` and write ``out_path`` (``test_accuracy`` left empty).

    For callers that do not measure the result; the build measures it first and writes the
    file once with the figure (:func:`quantize_graph` + :func:`sepconv.spec.save_model`).
    """
    source = onnx.load(Path(fp32_path))
    spec = spec_from_proto(source)
    quantized = quantize_graph(source, spec, calibration)
    return save_model(quantized, int8_spec(spec), Path(out_path))
