"""INT8 static quantization of the tiny fixture model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model.quantize import ArrayCalibrationReader, quantize_int8
from sepconv.spec import read_spec


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(n: int, seed: int) -> np.ndarray:
    # Smooth blobs rather than white noise: closer to real images, and activations have a
    # spread the calibrator can learn from.
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1, 7, 7)).astype(np.float32)
    return np.ascontiguousarray(np.kron(base, np.ones((1, 1, 4, 4), np.float32)))


@pytest.fixture(scope="module")
def int8_path(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    return quantize_int8(tiny_model_path, _images(64, seed=1), out)


def test_int8_model_has_quantized_graph_and_int8_metadata(tiny_model_path, int8_path):
    model = onnx.load(int8_path)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or "QLinearConv" in ops
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "conv weights should be stored as int8"

    fp32_spec, int8_spec = read_spec(str(tiny_model_path)), read_spec(str(int8_path))
    assert int8_spec.precision == "int8"
    assert int8_spec.test_accuracy is None  # the FP32 figure does not describe this model
    assert int8_spec.model_dump(exclude={"precision", "test_accuracy"}) == fp32_spec.model_dump(
        exclude={"precision", "test_accuracy"}
    )


def test_int8_logits_track_fp32(tiny_model_path, int8_path):
    x = _images(128, seed=2)
    fp32 = _session(tiny_model_path).run(None, {"input": x})[0]
    int8 = _session(int8_path).run(None, {"input": x})[0]
    assert int8.shape == fp32.shape == (128, 3)
    assert int8.dtype == np.float32
    # Loose bound: eight-bit activations through 27 layers of random weights.
    spread = float(np.abs(fp32).max())
    assert float(np.abs(int8 - fp32).max()) < 0.1 * spread
    agreement = float((int8.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= 0.8, f"top-1 agreement {agreement:.2f}"


def test_int8_batch_axis_stays_dynamic(int8_path):
    session = _session(int8_path)
    for n in (1, 5):
        assert session.run(None, {"input": _images(n, seed=3)})[0].shape == (n, 3)


def test_calibration_shape_is_checked(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match=r"calibration must be float32 \(N, 1, 28, 28\)"):
        quantize_int8(tiny_model_path, np.zeros((4, 3, 28, 28), np.float32), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_reader_batches_and_rewinds():
    reader = ArrayCalibrationReader(np.zeros((70, 1, 2, 2), np.float64), "input", batch_size=32)
    sizes = []
    while (item := reader.get_next()) is not None:
        assert item["input"].dtype == np.float32
        sizes.append(len(item["input"]))
    assert sizes == [32, 32, 6]
    reader.rewind()
    assert len(reader.get_next()["input"]) == 32
