"""The gRPC OIP codec and Triton's extension documents, without a server: our proto against the
descriptors compiled from Triton's own files (they ship in tritonclient), requests as
tritonclient.grpc builds them, responses as tritonclient.grpc reads them."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, json_format
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from sepconv.spec import ModelSpec
from service.errors import InvalidRequest
from service.protocols import oip, triton
from service.protocols.oip_grpc import codec
from service.protocols.oip_grpc import inference_pb2 as pb

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


# --- the proto ------------------------------------------------------------------------------------


def _triton_type(full_name: str):
    name = full_name.removeprefix("inference.")
    for file in (triton_pb2.DESCRIPTOR, triton_config_pb2.DESCRIPTOR):
        pool = file.pool
        try:
            return pool.FindMessageTypeByName(f"inference.{name}")
        except KeyError:
            try:
                return pool.FindEnumTypeByName(f"inference.{name}")
            except KeyError:
                continue
    raise AssertionError(f"{full_name} is not in Triton's protos")


def _walk(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _walk(nested)


def test_every_message_and_field_is_triton_s_on_the_wire():
    """Same full names, field numbers, types, labels and enum values as Triton's files: what
    makes our messages and tritonclient's interchangeable byte for byte."""
    checked = 0
    for top in pb.DESCRIPTOR.message_types_by_name.values():
        for ours in _walk(top):
            theirs = _triton_type(ours.full_name)
            for field in ours.fields:
                other = theirs.fields_by_name.get(field.name)
                assert other is not None, f"{ours.full_name}.{field.name} is not Triton's"
                assert (field.number, field.type, field.is_repeated) == (
                    other.number,
                    other.type,
                    other.is_repeated,
                ), f"{ours.full_name}.{field.name}"
                for attr in ("message_type", "enum_type"):
                    mine, yours = getattr(field, attr), getattr(other, attr)
                    assert (mine and mine.full_name) == (yours and yours.full_name)
                checked += 1
            for enum in ours.enum_types:
                assert {v.name: v.number for v in enum.values}.items() <= {
                    v.name: v.number for v in _triton_type(enum.full_name).values
                }.items()
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        theirs = _triton_type(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in theirs.values}
    assert checked > 60


def test_service_methods_are_triton_s():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name


def _drop_json_names(message) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)


def test_generated_modules_match_the_proto_and_live_in_a_private_pool():
    """The committed code is what ``python -m service.protocols.oip_grpc.generate`` writes."""
    pytest.importorskip("grpc_tools")
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from service.protocols.oip_grpc import generate

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{generate.ROOT}"]
        cmd += [f"--descriptor_set_out={out}", str(generate.PROTO.relative_to(generate.ROOT))]
        subprocess.run(cmd, check=True, cwd=generate.ROOT)
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # Generated code leaves out the JSON names protoc derives from the field names.
    for message in fresh.message_type:
        _drop_json_names(message)
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "run python -m service.protocols.oip_grpc.generate"
    # tritonclient's generated code (imported above) holds the same names in the default pool.
    assert pb.DESCRIPTOR.pool is pb.POOL
    assert triton_pb2.DESCRIPTOR.pool is not pb.POOL


# --- requests -------------------------------------------------------------------------------------


def as_ours(triton_request) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(triton_request.SerializeToString())


def tritonclient_request(inputs, outputs=None, **kwargs) -> pb.ModelInferRequest:
    """What ``tritonclient.grpc.InferenceServerClient.infer`` puts on the wire."""
    args = dict(
        model_name="tiny",
        inputs=inputs,
        model_version="",
        request_id="",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    args.update(kwargs)
    return as_ours(_get_inference_request(**args))


def fp32(x: np.ndarray, name: str = "input") -> InferInput:
    inp = InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def image(blobs: list[bytes]) -> InferInput:
    inp = InferInput("image", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return inp


def test_parse_fp32_raw_tensor_as_tritonclient_sends_it():
    x = np.random.default_rng(0).standard_normal((3, 1, 4, 4)).astype(np.float32)
    req = codec.parse_infer_request(tritonclient_request([fp32(x)], request_id="abc"), SPEC)
    assert req.id == "abc" and req.images is None and req.batch_size == 3
    np.testing.assert_array_equal(req.tensor, x)
    assert req.outputs == ()


def test_parse_image_bytes_and_classification_output():
    blobs = [b"\x89PNG\r\n\x1a\n\x00", b"", b"GIF89a" * 40]
    outputs = [InferRequestedOutput("probabilities", class_count=2)]
    req = codec.parse_infer_request(tritonclient_request([image(blobs)], outputs), SPEC)
    assert req.images == blobs and req.tensor is None
    assert req.outputs == (oip.RequestedOutput("probabilities", True, 2),)


def test_parse_typed_contents():
    x = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
    msg = pb.ModelInferRequest(model_name="tiny")
    t = msg.inputs.add(name="input", datatype="FP32", shape=[2, 1, 4, 4])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    np.testing.assert_array_equal(codec.parse_infer_request(msg, SPEC).tensor, x)
    msg = pb.ModelInferRequest(model_name="tiny")
    t = msg.inputs.add(name="image", datatype="BYTES", shape=[2, 1])
    t.contents.bytes_contents.extend([b"a", b"bc"])
    assert codec.parse_infer_request(msg, SPEC).images == [b"a", b"bc"]


def test_timeout_parameter_is_microseconds():
    x = np.zeros((1, 1, 4, 4), np.float32)
    assert codec.request_timeout_s(tritonclient_request([fp32(x)], timeout=250_000)) == 0.25
    assert codec.request_timeout_s(tritonclient_request([fp32(x)])) is None
    msg = tritonclient_request([fp32(x)])
    msg.parameters["timeout"].string_param = "soon"
    with pytest.raises(oip.OIPError, match="microseconds"):
        codec.request_timeout_s(msg)


def _msg(*inputs, raw=(), outputs=()) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="tiny", raw_input_contents=list(raw))
    for spec in inputs:
        item = msg.inputs.add(
            name=spec["name"], datatype=spec.get("datatype", ""), shape=spec.get("shape", [])
        )
        for key, value in spec.get("params", {}).items():
            item.parameters[key].string_param = value
        if "fp32" in spec:
            item.contents.fp32_contents.extend(spec["fp32"])
        if "bytes" in spec:
            item.contents.bytes_contents.extend(spec["bytes"])
        if "int" in spec:
            item.contents.int_contents.extend(spec["int"])
    for name, k in outputs:
        out = msg.outputs.add(name=name)
        if k is not None:
            out.parameters["classification"].CopyFrom(k)
    return msg


TENSOR = {"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4]}
IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1]}
RAW16 = np.zeros(16, np.float32).tobytes()
PROBS_OUT = "probabilities"


def _k(**kw) -> pb.InferParameter:
    return pb.InferParameter(**kw)


BAD = [
    (_msg(), "non-empty"),
    (_msg({"name": "pixels"}), "unknown input 'pixels'"),
    (_msg(TENSOR, IMAGE, raw=[RAW16, b""]), "exactly one input"),
    (_msg(TENSOR, raw=[RAW16, RAW16]), "2 entries for 1 inputs"),
    (_msg({**TENSOR, "datatype": "FP64"}, raw=[RAW16]), "datatype must be FP32"),
    (_msg({**TENSOR, "shape": [1, 3, 4, 4]}, raw=[RAW16]), "shape must be [N,1,4,4]"),
    (_msg({**TENSOR, "shape": [1, 1, 4, -4]}, raw=[RAW16]), "non-negative"),
    (_msg(TENSOR, raw=[RAW16[:-4]]), "needs 64 bytes"),
    (_msg({**TENSOR, "fp32": [0.0] * 16}, raw=[RAW16]), "both 'contents' and raw"),
    (_msg(TENSOR), "neither 'contents' nor raw"),
    (_msg({**TENSOR, "fp32": [0.0] * 15}), "has 16 elements, 'data' has 15"),
    (_msg({**TENSOR, "fp32": [float("nan")] * 16}), "NaN or infinity"),
    (_msg({**TENSOR, "int": [0] * 16}), "FP32 data goes in fp32_contents"),
    (_msg({**TENSOR, "params": {"shared_memory_region": "r"}}), "shared-memory"),
    (_msg({**IMAGE, "bytes": [b"a", b"b"]}), "says 1 images, got 2"),
    (_msg({**IMAGE, "shape": [1, 2], "bytes": [b"a"]}), "[N] or [N,1]"),
    (_msg({**IMAGE, "datatype": "FP32"}, raw=[b"\x00" * 4]), "datatype must be BYTES"),
    (_msg(IMAGE, raw=[b"\x05\x00\x00\x00ab"]), "declares 5 bytes"),
    (_msg(TENSOR, raw=[RAW16], outputs=[("logits", None)]), "unknown output 'logits'"),
    (_msg(TENSOR, raw=[RAW16], outputs=[("probabilities", None)] * 2), "requested twice"),
    (_msg(TENSOR, raw=[RAW16], outputs=[(PROBS_OUT, _k(int64_param=-1))]), "classification"),
    (_msg(TENSOR, raw=[RAW16], outputs=[(PROBS_OUT, _k(string_param="3"))]), "classification"),
]


@pytest.mark.parametrize(("msg", "needle"), BAD, ids=[needle for _, needle in BAD])
def test_malformed_requests_are_invalid_argument_naming_the_problem(msg, needle):
    with pytest.raises(oip.OIPError) as info:
        codec.parse_infer_request(msg, SPEC)
    assert info.value.status_code == 400
    assert needle in str(info.value)


# --- responses ------------------------------------------------------------------------------------

PROBS = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)


def read_with_tritonclient(response: pb.ModelInferResponse) -> InferResult:
    return InferResult(triton_pb2.ModelInferResponse.FromString(response.SerializeToString()))


def _request(outputs=(), request_id=None) -> oip.InferRequest:
    return oip.InferRequest(request_id, np.zeros((2, 1, 4, 4), np.float32), None, outputs, True)


def test_probabilities_response_reads_back_in_tritonclient():
    result = read_with_tritonclient(codec.infer_response(SPEC, _request(request_id="r1"), PROBS))
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, PROBS)
    response = result.get_response()
    assert response.id == "r1" and response.model_name == "tiny" and response.model_version == "7"


def test_classification_response_is_triton_s_strings():
    request = _request([oip.RequestedOutput("probabilities", True, 2)])
    result = read_with_tritonclient(codec.infer_response(SPEC, request, PROBS))
    assert result.get_output("probabilities").datatype == "BYTES"
    assert result.as_numpy("probabilities").tolist() == [
        [b"0.700000:1:square", b"0.200000:2:cross"],
        [b"0.500000:0:circle", b"0.300000:2:cross"],
    ]


def test_metadata_messages_carry_the_rest_documents():
    meta = codec.model_metadata(SPEC)
    assert json_format.MessageToDict(meta, preserving_proto_field_name=True) == {
        **oip.model_metadata(SPEC),
        # protobuf's JSON form writes int64 as strings; the values are the same.
        "inputs": [
            {**t, "shape": [str(d) for d in t["shape"]]} for t in oip.model_metadata(SPEC)["inputs"]
        ],
        "outputs": [
            {**t, "shape": [str(d) for d in t["shape"]]}
            for t in oip.model_metadata(SPEC)["outputs"]
        ],
    }
    server = codec.server_metadata({"name": "s", "version": "1", "extensions": ["a", "b"]})
    assert list(server.extensions) == ["a", "b"]


# --- Triton's extension documents --------------------------------------------------------------


def config() -> dict:
    return triton.model_config(
        SPEC, max_batch_size=32, max_queue_delay_us=2000, instances=2, gpu=False
    )


def test_model_config_document_parses_into_triton_s_model_config():
    doc = config()
    theirs = json_format.ParseDict(doc, triton_config_pb2.ModelConfig())
    ours = codec.from_document(doc, pb.ModelConfig())
    assert theirs.SerializeToString() == ours.SerializeToString()
    assert theirs.max_batch_size == 32 and theirs.platform == "onnxruntime_onnx"
    first, second = theirs.input
    assert (first.name, first.data_type, list(first.dims)) == (
        "input",
        triton_config_pb2.TYPE_FP32,
        [1, 4, 4],
    )
    assert first.optional and second.optional and second.data_type == triton_config_pb2.TYPE_STRING
    (out,) = theirs.output
    assert out.name == "probabilities" and list(out.dims) == [3]
    assert theirs.dynamic_batching.max_queue_delay_microseconds == 2000
    assert theirs.instance_group[0].count == 2
    assert theirs.instance_group[0].kind == triton_config_pb2.ModelInstanceGroup.KIND_CPU


def test_model_config_agrees_with_the_metadata_perf_analyzer_reads_with_it():
    """perf_analyzer drops the first metadata dim when max_batch_size > 0 and looks every config
    input up among the metadata inputs."""
    meta = {t["name"]: t for t in oip.model_metadata(SPEC)["inputs"]}
    for item in config()["input"]:
        assert item["name"] in meta
        assert meta[item["name"]]["shape"][0] == -1
    assert meta["input"]["shape"][1:] == config()["input"][0]["dims"]


def test_statistics_document_has_every_field_perf_analyzer_reads():
    stats = triton.ModelStats(
        inference_count=10,
        execution_count=3,
        last_inference_ms=1_700_000_000_000,
        durations={
            "success": triton.Duration.from_seconds(4, 0.5),
            "queue": triton.Duration(4, 1000),
            "compute_input": triton.Duration(4, 10),
            "compute_infer": triton.Duration(4, 20),
            "compute_output": triton.Duration(4, 30),
        },
    )
    doc = triton.model_statistics([(SPEC, stats)])
    (model,) = doc["model_stats"]
    assert model["name"] == "tiny" and model["version"] == "7"
    assert model["inference_count"] == 10 and model["execution_count"] == 3
    for name in triton.INFERENCE_STATS:
        entry = model["inference_stats"][name]
        assert isinstance(entry["count"], int) and isinstance(entry["ns"], int)
    assert model["inference_stats"]["success"] == {"count": 4, "ns": 500_000_000}
    assert model["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    theirs = json_format.ParseDict(doc, triton_pb2.ModelStatisticsResponse())
    ours = codec.from_document(doc, pb.ModelStatisticsResponse())
    assert theirs.SerializeToString() == ours.SerializeToString()
    assert theirs.model_stats[0].inference_stats.queue.ns == 1000


def test_repository_index_entries_fill_the_grpc_message():
    from service.engine.repository import IndexEntry, State

    entries = [
        IndexEntry("tiny", "7", State.READY),
        IndexEntry("tiny", "8", State.UNAVAILABLE, "version 8: not a readable ONNX model"),
    ]
    msg = codec.from_document(
        {"models": [e.document() for e in entries]}, pb.RepositoryIndexResponse()
    )
    assert [(m.version, m.state) for m in msg.models] == [("7", "READY"), ("8", "UNAVAILABLE")]
    assert "not a readable" in msg.models[1].reason


def test_repository_request_bodies_and_parameters():
    assert triton.index_request(b"") is False
    assert triton.index_request(b'{"ready": true}') is True
    for body, needle in ((b"{nope", "not valid JSON"), (b'{"ready": "yes"}', "'ready'")):
        with pytest.raises(InvalidRequest, match=needle):
            triton.index_request(body)
    triton.repository_request(b"", "load")
    triton.repository_request(b'{"parameters": {}}', "load")
    triton.repository_request(b'{"parameters": {"unload_dependents": true}}', "unload")
    with pytest.raises(InvalidRequest, match="models are loaded from the repository folder"):
        triton.repository_request(b'{"parameters": {"config": "{}"}}', "load")
    with pytest.raises(InvalidRequest, match="not supported"):
        triton.check_repository_parameters("load", {"file:1/model.onnx": b"..."})
    with pytest.raises(InvalidRequest, match="unknown unload parameter 'force'"):
        triton.repository_request(b'{"parameters": {"force": true}}', "unload")
    with pytest.raises(InvalidRequest, match="JSON object"):
        triton.repository_request(b"[1]", "load")
    request = pb.RepositoryModelUnloadRequest(model_name="tiny")
    request.parameters["unload_dependents"].bool_param = True
    assert codec.repository_parameters(request) == {"unload_dependents": True}


def test_extensions_and_numeric_versions():
    assert {
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "model_repository",
        "statistics",
    } <= set(triton.server_extensions())
    assert triton.is_numeric_version("1") and triton.is_numeric_version("20261122")
    assert not triton.is_numeric_version("test") and not triton.is_numeric_version("1.0")
    assert not triton.is_numeric_version("")


def test_bytes_helper_agrees_with_tritonclient():
    assert (
        oip.serialize_bytes([b"ab", b""])
        == serialize_byte_tensor(np.array([b"ab", b""], dtype=np.object_)).item()
    )
