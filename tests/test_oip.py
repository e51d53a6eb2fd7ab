"""Open Inference Protocol v2: the codec on its own, the routes in-process, and the real
``tritonclient.http`` client against a real server."""

from __future__ import annotations

import base64
import struct

import numpy as np
import orjson
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

from service import oip
from service.spec import ModelSpec

LABELS = ["circle", "square", "cross"]
SPEC = ModelSpec(
    name="tiny",
    version="7",
    labels=LABELS,
    input_size=4,
    color_mode="L",
    mean=[0.5],
    std=[0.25],
    alpha=0.25,
)


def encode(inputs, outputs=None, **kwargs) -> tuple[bytes, str | None]:
    """Build a request body exactly as tritonclient does; returns (body, header length)."""
    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs, **kwargs)
    return body, None if json_size is None else str(json_size)


def fp32_input(x: np.ndarray, binary: bool, name: str = "input") -> InferInput:
    inp = InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def image_input(images: list[bytes], binary: bool) -> InferInput:
    inp = InferInput(oip.IMAGE_INPUT, [len(images)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:
        b64 = [base64.b64encode(i) for i in images]
        inp.set_data_from_numpy(np.array(b64, dtype=np.object_), binary_data=False)
    return inp


def parse_error(body: bytes, header: str | None = None) -> str:
    with pytest.raises(oip.OIPError) as info:
        oip.parse_request(body, header, SPEC)
    assert info.value.status_code == 400
    return str(info.value)


def raw_request(doc: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = orjson.dumps(doc)
    return head + binary, (str(len(head)) if binary else None)


# --- codec: requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_parse_fp32_tensor_as_tritonclient_sends_it(binary):
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    body, header = encode([fp32_input(x, binary)], request_id="abc")
    req = oip.parse_request(body, header, SPEC)
    assert req.id == "abc"
    assert req.images is None
    assert req.tensor.dtype == np.float32 and req.tensor.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(req.tensor, x)
    assert req.batch_size == 3
    # No outputs named: tritonclient asks for every output in binary.
    assert req.outputs == () and req.binary_output is True


def test_parse_nested_json_data_is_row_major():
    x = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
    doc = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 4, 4], "data": x.tolist()}]
    }
    req = oip.parse_request(*raw_request(doc), SPEC)
    np.testing.assert_array_equal(req.tensor, x)
    assert req.binary_output is False


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary"])
def test_parse_image_bytes(binary):
    images = [b"\x89PNG\r\n\x1a\n\x00\xff", b"\x00", b"GIF89a" * 50]
    body, header = encode([image_input(images, binary)])
    req = oip.parse_request(body, header, SPEC)
    assert req.images == images and req.tensor is None and req.batch_size == 3


def test_parse_requested_outputs():
    x = np.zeros((1, 1, 4, 4), np.float32)
    outputs = [InferRequestedOutput("probabilities", binary_data=False, class_count=2)]
    req = oip.parse_request(*encode([fp32_input(x, True)], outputs), SPEC)
    assert req.outputs == (oip.RequestedOutput("probabilities", False, 2),)
    assert req.binary_output is False


def test_bytes_roundtrip_matches_tritonclient():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    elements = [b"", b"a", b"\x00" * 300, "é".encode()]
    ours = oip.serialize_bytes(elements)
    assert ours == serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()
    assert list(deserialize_bytes_tensor(ours)) == elements
    assert oip.deserialize_bytes(ours) == elements


def _tensor(**overrides) -> dict:
    item = {"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.0] * 16}
    return {"inputs": [{**item, **overrides}]}


def _image(**overrides) -> dict:
    item = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}
    return {"inputs": [{**item, **overrides}]}


def _out(**params) -> dict:
    return {**_tensor(), "outputs": [{"name": "probabilities", "parameters": params}]}


def _bin(doc: dict, size: int) -> dict:
    """Mark the only input as binary with ``binary_data_size`` = size (and drop its data)."""
    item = {k: v for k, v in doc["inputs"][0].items() if k != "data"}
    return {"inputs": [{**item, "parameters": {"binary_data_size": size}}]}


BAD_JSON = [
    ([1, 2], "JSON object"),
    ({}, "'inputs'"),
    ({"inputs": []}, "'inputs'"),
    ({"inputs": [{"name": "pixels"}]}, "unknown input 'pixels'"),
    ({"inputs": [_tensor()["inputs"][0], _image()["inputs"][0]]}, "exactly one input"),
    (_tensor(datatype="FP64"), "datatype must be FP32"),
    (_tensor(datatype="INT8"), "datatype must be FP32"),
    (_tensor(shape=[1, 3, 4, 4]), "shape must be [N,1,4,4]"),
    (_tensor(shape=[0, 1, 4, 4], data=[]), "N >= 1"),
    (_tensor(shape=[16]), "shape must be"),
    (_tensor(shape=[1, 1, 4, -4]), "non-negative integers"),
    (_tensor(shape="1x1x4x4"), "non-negative integers"),
    (_tensor(data=[0.0] * 15), "has 16 elements, 'data' has 15"),
    (_tensor(data=["a"] * 16), "only numbers"),
    (_tensor(data=[True] * 16), "only numbers"),
    (_tensor(data=None), "only numbers"),
    (_tensor(data=[[0.0] * 8, [0.0] * 7]), "regular array"),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1]}]}, "neither 'data'"),
    (_tensor(parameters={"shared_memory_region": "r"}), "shared-memory"),
    ({"id": 5, **_tensor()}, "'id' must be a string"),
    ({**_tensor(), "parameters": []}, "'parameters'"),
    ({**_tensor(), "parameters": {"binary_data_output": 1}}, "binary_data_output"),
    ({**_tensor(), "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ({**_tensor(), "outputs": [{"name": "probabilities"}] * 2}, "requested twice"),
    (_out(classification=-1), "classification"),
    (_out(classification=1.5), "classification"),
    (_out(binary_data="yes"), "binary_data"),
    (_image(datatype="FP32"), "datatype must be BYTES"),
    (_image(shape=[1, 2], data=["AA==", "AA=="]), "[N] or [N,1]"),
    (_image(data=["not base64!"]), "not valid base64"),
    (_image(shape=[2]), "says 2 images, got 1"),
    (_image(data=[3]), "base64 strings"),
]

BAD_BINARY = [
    (_bin(_tensor(), 64), b"\x00" * 60, "only 60 bytes"),
    (_bin(_tensor(), 60), b"\x00" * 60, "needs 64 bytes"),
    (_bin(_tensor(), 64), b"\x00" * 65, "1 bytes of binary data"),
    (_bin(_tensor(), -1), b"\x00", "non-negative integer"),
    (_bin(_image(), 6), struct.pack("<I", 5) + b"ab", "declares 5 bytes"),
    (_bin(_image(), 2), b"ab", "length prefix"),
]


@pytest.mark.parametrize(("doc", "needle"), BAD_JSON)
def test_malformed_json_requests_are_400_naming_the_problem(doc, needle):
    assert needle in parse_error(orjson.dumps(doc))


@pytest.mark.parametrize(("doc", "binary", "needle"), BAD_BINARY)
def test_malformed_binary_requests_are_400_naming_the_problem(doc, binary, needle):
    assert needle in parse_error(*raw_request(doc, binary))


@pytest.mark.parametrize(
    ("body", "header", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (orjson.dumps(_tensor()) + b"\x00" * 64, None, f"needs a {oip.HEADER_LENGTH} header"),
        (orjson.dumps(_tensor()), "abc", "must be an integer"),
        (orjson.dumps(_tensor()), "0", "length of the JSON part"),
        (orjson.dumps(_tensor()), "99999", "length of the JSON part"),
        (orjson.dumps(_tensor()), "10", "not valid JSON"),
    ],
)
def test_bad_body_framing_is_400(body, header, needle):
    assert needle in parse_error(body, header)


def test_non_finite_binary_tensor_is_rejected():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 2] = np.nan
    assert "NaN or infinity" in parse_error(*encode([fp32_input(x, True)]))


# --- codec: responses --------------------------------------------------------------------------


def _request(outputs=(), binary_output=False, request_id=None) -> oip.InferRequest:
    return oip.InferRequest(
        id=request_id,
        tensor=np.zeros((2, 1, 4, 4), np.float32),
        images=None,
        outputs=tuple(outputs),
        binary_output=binary_output,
    )


PROBS = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)


def decode(body: bytes, header_length: int | None):
    return InferenceServerClient.parse_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_response_probabilities_decode_with_tritonclient(binary):
    req = _request([oip.RequestedOutput("probabilities", binary, 0)], request_id="r1")
    body, header_len = oip.build_response(
        model_name="tiny", model_version="7", request=req, probs=PROBS, labels=LABELS
    )
    assert (header_len is not None) == binary
    result = decode(body, header_len)
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, PROBS)
    response = result.get_response()
    assert response["id"] == "r1"
    assert response["model_name"] == "tiny" and response["model_version"] == "7"
    if not binary:
        # Flat, row-major, and each value the shortest text that reads back as the same float32.
        data = orjson.loads(body)["outputs"][0]["data"]
        assert data == [0.1, 0.7, 0.2, 0.5, 0.2, 0.3]


def test_response_defaults_follow_binary_data_output():
    body, header_len = oip.build_response(
        model_name="tiny",
        model_version="7",
        request=_request(binary_output=True),
        probs=PROBS,
        labels=LABELS,
    )
    assert header_len is not None and len(body) == header_len + PROBS.nbytes
    np.testing.assert_array_equal(decode(body, header_len).as_numpy("probabilities"), PROBS)
    assert "id" not in orjson.loads(body[:header_len])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_response_classification_top_k(binary):
    req = _request([oip.RequestedOutput("probabilities", binary, 2)])
    body, header_len = oip.build_response(
        model_name="tiny", model_version="7", request=req, probs=PROBS, labels=LABELS
    )
    result = decode(body, header_len)
    assert result.get_output("probabilities")["datatype"] == "BYTES"
    got = result.as_numpy("probabilities")
    assert got.shape == (2, 2)
    assert [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got] == [
        ["0.700000:1:square", "0.200000:2:cross"],
        ["0.500000:0:circle", "0.300000:2:cross"],
    ]


def test_classification_count_above_classes_returns_all_classes():
    strings = oip.classification_strings(PROBS, 10, LABELS)
    assert len(strings) == 6
    assert [s.split(b":")[1] for s in strings] == [b"1", b"2", b"0", b"0", b"2", b"1"]


def test_metadata_documents():
    meta = oip.model_metadata(SPEC)
    assert meta["name"] == "tiny" and meta["versions"] == ["7"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]} in meta["inputs"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    server = oip.server_metadata("1.2.3")
    assert server["version"] == "1.2.3"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
