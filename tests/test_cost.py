"""The cost report: exact counts on hand-computable graphs, the paper's figures, both front ends."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sepconv.cost import (
    CostError,
    CostReport,
    LayerKind,
    analyze_model,
    profile_model,
    render_markdown,
    render_text,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- graph builders


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    rng = np.random.default_rng(len(name))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


class _Builder:
    """A chain of nodes from ``x`` (batch axis symbolic, as the exporter writes it)."""

    def __init__(self, channels: int, height: int, width: int | None = None):
        self.shape = ["batch", channels, height, width or height]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.last = "x"

    def conv(self, name, m, n, k=(3, 3), group=1, bias=True, source=None, **attrs):
        inputs = [source or self.last, f"{name}.w"]
        self.inits.append(_init(f"{name}.w", (n, m // group, *k)))
        if bias:
            inputs.append(f"{name}.b")
            self.inits.append(_init(f"{name}.b", (n,)))
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [name], name=name, kernel_shape=list(k), group=group, **attrs
            )
        )
        self.last = name
        return self

    def op(self, op_type, name, *consts, **attrs):
        for cname, shape in consts:
            self.inits.append(_init(cname, shape))
        inputs = [self.last, *(c for c, _ in consts)]
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        self.last = name
        return self

    def model(self, outputs=None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
            [
                helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * 4)
                for o in outputs or [self.last]
            ],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.checker.check_model(model)
        return model


def _layer(report: CostReport, name: str):
    return next(layer for layer in report.layers if layer.name == name)


# --------------------------------------------------------------------------- exact counts


def test_single_standard_conv_counts_and_batch_fixed_to_one():
    report = analyze_model(_Builder(3, 10).conv("c", 3, 8, pads=[1, 1, 1, 1]).model())
    layer = _layer(report, "c")
    assert layer.kind == LayerKind.STANDARD and layer.label == "Conv 3x3"
    assert (layer.input_h, layer.input_w, layer.input_channels) == (10, 10, 3)
    assert (layer.output_h, layer.output_w, layer.output_channels) == (10, 10, 8)
    assert layer.mult_adds == 3 * 3 * 3 * 8 * 10 * 10  # Dk^2 * M * N * Dp^2
    assert (layer.weight_params, layer.bias_params, layer.params) == (216, 8, 224)
    assert report.model.input_shape == [1, 3, 10, 10]
    assert report.separable_pairs == []
    assert report.totals.full_conv_mult_adds == report.totals.mult_adds
    assert report.totals.bn_folded


def test_non_square_kernel_strides_and_asymmetric_padding():
    model = (
        _Builder(4, 11, 17)
        .conv("c", 4, 6, k=(3, 5), strides=[2, 3], pads=[1, 2, 0, 1], bias=False)
        .model()
    )
    layer = _layer(analyze_model(model), "c")
    # H: (11 + 1 + 0 - 3) // 2 + 1 = 5;  W: (17 + 2 + 1 - 5) // 3 + 1 = 6
    assert (layer.output_h, layer.output_w) == (5, 6)
    assert (layer.kernel_h, layer.kernel_w, layer.stride_h, layer.stride_w) == (3, 5, 2, 3)
    assert layer.pads == [1, 2, 0, 1]
    assert layer.mult_adds == 3 * 5 * 4 * 6 * 5 * 6
    assert layer.params == 3 * 5 * 4 * 6


def test_auto_pad_same_upper_reports_the_padding_it_implies():
    model = _Builder(2, 7).conv("c", 2, 2, strides=[2, 2], auto_pad="SAME_UPPER").model()
    layer = _layer(analyze_model(model), "c")
    # out 4; total pad = (4 - 1) * 2 + 3 - 7 = 2 -> 1 before, 1 after
    assert (layer.output_h, layer.pads) == (4, [1, 1, 1, 1])


def test_grouped_conv_that_is_not_depthwise():
    model = (
        _Builder(8, 6)
        .conv("g", 8, 16, group=4, pads=[1, 1, 1, 1])
        .op("Relu", "r")
        .conv("p", 16, 4, k=(1, 1))
        .model()
    )
    report = analyze_model(model)
    layer = _layer(report, "g")
    assert layer.kind == LayerKind.GROUPED and layer.label == "Conv grouped 3x3"
    assert layer.mult_adds == 3 * 3 * (8 // 4) * 16 * 6 * 6
    assert layer.params == 16 * 2 * 3 * 3 + 16
    assert _layer(report, "p").kind == LayerKind.POINTWISE
    assert report.separable_pairs == []  # a grouped conv is no depthwise half


def test_separable_pair_exact_counts_and_ratio():
    m, n, dp = 4, 6, 4
    model = (
        _Builder(m, 8)
        .conv("dw", m, m, group=m, strides=[2, 2], pads=[1, 1, 1, 1])
        .op("Relu", "r")
        .conv("pw", m, n, k=(1, 1))
        .model()
    )
    report = analyze_model(model)
    dw, pw = _layer(report, "dw"), _layer(report, "pw")
    assert dw.kind == LayerKind.DEPTHWISE and dw.label == "Conv DW 3x3"
    assert dw.mult_adds == 9 * m * dp * dp
    assert pw.mult_adds == m * n * dp * dp
    (pair,) = report.separable_pairs
    assert (pair.depthwise, pair.pointwise, pair.between) == ("dw", "pw", ["Relu"])
    assert pair.standard_mult_adds == 9 * m * n * dp * dp
    assert pair.separable_mult_adds == 9 * m * dp * dp + m * n * dp * dp
    assert Fraction(pair.ratio_exact) == Fraction(1, n) + Fraction(1, 9) == Fraction(5, 18)
    assert pair.formula_exact == pair.ratio_exact and pair.agrees
    assert pair.ratio == pytest.approx(5 / 18)
    # The full-conv network: the pair becomes one 3x3 conv with the pointwise's bias.
    assert pair.standard_params == 9 * m * n + n
    assert pair.separable_params == (9 * m + m) + (m * n + n)
    t = report.totals
    assert t.full_conv_mult_adds == pair.standard_mult_adds
    assert t.full_conv_params == pair.standard_params
    assert t.mult_adds_reduction == pytest.approx(18 / 5)


@pytest.mark.parametrize("m,n,k", [(3, 7, 3), (16, 32, 5), (32, 1024, 3), (5, 5, 1)])
def test_pair_ratio_agrees_with_one_over_n_plus_one_over_dk_squared(m, n, k):
    pad = k // 2
    model = (
        _Builder(m, 9)
        .conv("dw", m, m, k=(k, k), group=m, pads=[pad] * 4)
        .conv("pw", m, n, k=(1, 1), bias=False)
        .model()
    )
    (pair,) = analyze_model(model).separable_pairs
    assert Fraction(pair.ratio_exact) == Fraction(1, n) + Fraction(1, k * k)
    assert pair.agrees and pair.between == []


def test_depthwise_multiplier_scales_the_formula():
    model = (
        _Builder(4, 5)
        .conv("dw", 4, 8, group=4, pads=[1, 1, 1, 1])
        .conv("pw", 8, 10, k=(1, 1))
        .model()
    )
    report = analyze_model(model)
    assert _layer(report, "dw").kind == LayerKind.DEPTHWISE
    (pair,) = report.separable_pairs
    assert pair.multiplier == 2
    assert Fraction(pair.formula_exact) == 2 * (Fraction(1, 10) + Fraction(1, 9))
    assert pair.agrees


def test_unfolded_batchnorm_is_reported_and_passed_through():
    m = 4
    bn = [(f"bn.{p}", (m,)) for p in ("scale", "bias", "mean", "var")]
    model = (
        _Builder(m, 6)
        .conv("dw", m, m, group=m, pads=[1, 1, 1, 1], bias=False)
        .op("BatchNormalization", "bn", *bn)
        .op("Clip", "clip")
        .conv("pw", m, 3, k=(1, 1), bias=False)
        .model()
    )
    # BN statistics must be positive for a well-formed model; the counts do not care.
    report = analyze_model(model)
    (pair,) = report.separable_pairs
    assert pair.between == ["BatchNormalization", "Clip"]
    t = report.totals
    assert not t.bn_folded and t.batchnorm_nodes == 1
    assert t.other_params == 4 * m
    assert t.params == 9 * m + m * 3  # BN stays out of the layer params
    assert "BN folded: no" in render_text(report)


@pytest.mark.parametrize(
    "variant",
    ["pointwise_stride_2", "two_consumers", "pooling_between"],
)
def test_no_pair_when_the_pointwise_does_not_directly_follow(variant):
    b = _Builder(4, 8).conv("dw", 4, 4, group=4, pads=[1, 1, 1, 1])
    outputs = None
    if variant == "pointwise_stride_2":
        b.conv("pw", 4, 6, k=(1, 1), strides=[2, 2])
    elif variant == "two_consumers":
        b.conv("pw", 4, 6, k=(1, 1)).conv("other", 4, 2, k=(1, 1), source="dw")
        outputs = ["pw", "other"]
    else:
        b.op("MaxPool", "pool", kernel_shape=[2, 2], strides=[2, 2]).conv("pw", 4, 6, k=(1, 1))
    assert analyze_model(b.model(outputs)).separable_pairs == []


def test_gemm_and_matmul_count_per_sample():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1),
            helper.make_node("MatMul", ["y", "w2"], ["h"], name="mm"),
            helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
            helper.make_node("MatMul", ["ht", "h"], ["z"], name="outer"),
        ],
        "g",
        [x],
        [y, z],
        [_init("w", (10, 16)), _init("b", (10,)), _init("w2", (10, 5))],
    )
    report = analyze_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    fc, mm, outer = (_layer(report, n) for n in ("fc", "mm", "outer"))
    assert (fc.kind, fc.mult_adds, fc.params, fc.bias_params) == (
        LayerKind.FULLY_CONNECTED,
        16 * 10,
        170,
        10,
    )
    assert (fc.input_channels, fc.output_channels, fc.output_h) == (16, 10, None)
    assert (mm.kind, mm.mult_adds, mm.params) == (LayerKind.FULLY_CONNECTED, 10 * 5, 50)
    # (5 x 1) @ (1 x 5): 25 outputs of a length-1 dot product, no parameters.
    assert (outer.kind, outer.mult_adds, outer.params) == (LayerKind.MATMUL, 25, 0)
    labels = {s.label: s for s in report.shares}
    assert labels["Fully connected"].mult_adds_share == pytest.approx(210 / 235)


def test_symbolic_spatial_axes_need_an_input_size():
    b = _Builder(3, 8).conv("c", 3, 4, pads=[1, 1, 1, 1])
    b.shape = ["batch", 3, "h", "w"]
    model = b.model()
    with pytest.raises(CostError, match="symbolic"):
        analyze_model(model)
    assert _layer(analyze_model(model, input_size=12), "c").output_h == 12


def test_a_graph_without_layers_is_an_error():
    model = _Builder(3, 4).op("Relu", "r").model()
    with pytest.raises(CostError, match="no Conv"):
        analyze_model(model)


# --------------------------------------------------------------------------- exported models


def test_tiny_export_is_fully_paired_and_renders(tiny_model_path):
    report = analyze_model(tiny_model_path)
    assert report.model.input_shape == [1, 1, 28, 28]
    assert report.model.name == "tiny-l"
    assert len(report.separable_pairs) == 13
    assert all(p.agrees for p in report.separable_pairs)
    assert report.totals.bn_folded
    # BN with non-trivial statistics folds into a bias on every conv.
    convs = [layer for layer in report.layers if layer.op_type == "Conv"]
    assert all(layer.bias_params == layer.output_channels for layer in convs)
    assert report.totals.mult_adds == sum(layer.mult_adds for layer in report.layers)
    labels = [s.label for s in report.shares]
    assert set(labels) == {"Conv 1x1", "Conv DW 3x3", "Conv 3x3", "Fully connected"}
    assert sum(s.mult_adds_share for s in report.shares) == pytest.approx(1.0)
    md = render_markdown(report)
    assert "| Conv DW 3x3 | 13 |" in md and "### Separable pairs" in md
    assert CostReport.model_validate_json(report.model_dump_json()) == report


@pytest.mark.parametrize("optimization", ["all", "basic"])
def test_profile_maps_every_layer_to_kernel_time(tiny_model_path, optimization):
    report = analyze_model(tiny_model_path)
    profile = profile_model(tiny_model_path, report, runs=2, optimization=optimization)
    assert profile.runs == 2 and profile.optimization == optimization
    # Fused or not, each counted layer's kernel is found in the trace under some name.
    assert all(layer.time_us > 0 for layer in profile.layers)
    assert {k.label for k in profile.kinds} == {s.label for s in report.shares}
    assert sum(k.time_share for k in profile.kinds) + profile.other_ms / profile.kernel_ms == (
        pytest.approx(1.0)
    )
    # Only shape-changing or layout nodes stay unattributed.
    assert all(
        any(tag in n.lower() for tag in ("mean", "reshape", "reorder", "flatten", "pool"))
        for n in profile.unmapped_nodes
    )
    text = render_text(report.model_copy(update={"profile": profile}))
    assert "Measured (ONNX Runtime profile)" in text


def test_profile_runs_are_bounded(tiny_model_path):
    with pytest.raises(CostError, match="runs"):
        profile_model(tiny_model_path, runs=0)


@pytest.fixture(scope="session")
def paper_224(tmp_path_factory) -> Path:
    """Untrained MobileNet 1.0, 224 px RGB, 1000 classes, exported like the build step does."""
    pytest.importorskip("torch")
    from model.export import export_onnx
    from model.network import MobileNetV1
    from sepconv.spec import ModelSpec

    spec = ModelSpec(
        name="mobilenet_v1-1.0-224",
        labels=[f"class_{i}" for i in range(1000)],
        input_size=224,
        color_mode="RGB",
        mean=[0.5] * 3,
        std=[0.25] * 3,
        alpha=1.0,
    )
    net = MobileNetV1(num_classes=1000, in_channels=3, alpha=1.0)
    return export_onnx(net, spec, tmp_path_factory.mktemp("paper") / "model.onnx")


def _reference_counts(size: int = 224) -> tuple[int, int]:
    """Mult-adds and weights of MobileNet 1.0 written out from the paper's Table 1."""
    from model.network import BLOCKS, STEM_CHANNELS

    side = size // 2
    macs = 3 * 3 * 3 * STEM_CHANNELS * side * side
    params = 3 * 3 * 3 * STEM_CHANNELS
    m = STEM_CHANNELS
    for n, stride in BLOCKS:
        side //= stride
        macs += 9 * m * side * side + m * n * side * side
        params += 9 * m + m * n
        m = n
    return macs + m * 1000, params + m * 1000  # + FC (its zero bias is dropped by the export)


@pytest.mark.slow
def test_paper_table_6_and_2_figures_for_1_0_224(paper_224):
    report = analyze_model(paper_224)
    t = report.totals
    macs, params = _reference_counts()
    assert (t.mult_adds, t.params) == (macs, params) == (568_740_352, 4_209_088)
    assert round(t.mult_adds / 1e6) == 569  # Table 6: 569M
    assert round(t.params / 1e6, 1) == 4.2  # Table 6: 4.2M
    # Table 4: Conv MobileNet 4866M mult-adds, 29.3M params.
    assert round(t.full_conv_params / 1e6, 1) == 29.3
    assert abs(t.full_conv_mult_adds / 1e6 - 4866) < 2  # 4867.29M exact, see docs/cost.md
    shares = {s.label: s for s in report.shares}
    # Table 2, per cent of mult-adds and of params.
    for label, macs_pct, params_pct in [
        ("Conv 1x1", 94.86, 74.59),
        ("Conv DW 3x3", 3.06, 1.06),
        ("Conv 3x3", 1.91, 0.02),  # the paper prints 1.19%: its four rows then sum to 99.29%
        ("Fully connected", 0.18, 24.33),
    ]:
        assert round(shares[label].mult_adds_share * 100, 2) == macs_pct, label
        assert round(shares[label].params_share * 100, 2) == params_pct, label
    assert len(report.separable_pairs) == 13 and all(p.agrees for p in report.separable_pairs)


# --------------------------------------------------------------------------- front ends


def test_cli_prints_json_and_markdown(tiny_model_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "model.cost_cli", str(tiny_model_path), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    done = cli("--format", "json")
    assert done.returncode == 0, done.stderr
    report = CostReport.model_validate(json.loads(done.stdout))
    assert len(report.separable_pairs) == 13 and report.profile is None
    done = cli("--format", "markdown", "--profile", "--runs", "2")
    assert done.returncode == 0, done.stderr
    assert "### Measured (ONNX Runtime profile)" in done.stdout
    assert "| Conv 1x1 |" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "model.cost_cli", str(tiny_model_path.parent / "missing.onnx")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.fixture(scope="module")
def client(tiny_model_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(model_path=tiny_model_path, provider="cpu", warmup_runs=0)
    with TestClient(create_app(settings)) as c:
        yield c


def test_endpoint_json_matches_the_schema(client, tiny_model_path):
    r = client.get("/v1/cost")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    report = CostReport.model_validate(r.json())
    assert report == analyze_model(tiny_model_path).model_copy(update={"model": report.model})
    assert report.model.path == str(tiny_model_path)
    assert report.profile is None
    schema = client.get("/openapi.json").json()
    ok = schema["paths"]["/v1/cost"]["get"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/CostReport")
    assert {"text/markdown", "text/plain"} <= set(ok)


@pytest.mark.parametrize(
    "params,headers,media,marker",
    [
        ({}, {"Accept": "text/markdown"}, "text/markdown", "| Conv DW 3x3 |"),
        ({"format": "text"}, {"Accept": "application/json"}, "text/plain", "Share per layer"),
        ({}, {"Accept": "text/plain;q=0.5, text/markdown"}, "text/markdown", "### Layers"),
        ({}, {"Accept": "*/*"}, "application/json", '"separable_pairs"'),
    ],
)
def test_endpoint_negotiates_the_format(client, params, headers, media, marker):
    r = client.get("/v1/cost", params=params, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(media)
    assert marker in r.text


def test_endpoint_rejects_bad_format_accept_and_runs(client):
    r = client.get("/v1/cost", params={"format": "yaml"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_format"
    r = client.get("/v1/cost", headers={"Accept": "image/png"})
    assert r.status_code == 406 and r.json()["error"] == "not_acceptable"
    r = client.get("/v1/cost", params={"profile": "true", "runs": 0})
    assert r.status_code == 422 and "runs" in r.json()["detail"]


def test_endpoint_profiles_on_demand(client):
    r = client.get("/v1/cost", params={"profile": "true", "runs": 2})
    assert r.status_code == 200
    profile = CostReport.model_validate(r.json()).profile
    assert profile is not None and profile.runs == 2
    assert profile.providers == ["CPUExecutionProvider"]
    assert all(layer.time_us > 0 for layer in profile.layers)


def test_model_cli_registers_the_cost_subcommand(tiny_model_path):
    pytest.importorskip("model.cli")
    done = subprocess.run(
        [sys.executable, "-m", "model", "cost", str(tiny_model_path), "--format", "markdown"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "### Separable pairs" in done.stdout and "| Conv DW 3x3 | 13 |" in done.stdout


def test_endpoint_reports_the_served_graph_even_if_the_file_is_replaced(
    tmp_path, tiny_model_path, tiny_rgb_model_path
):
    """The report describes the bytes the session runs, not whatever is on disk now; a profile
    needs those bytes again, so once the file changed it asks for the new one to be loaded."""
    import shutil

    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    served = tmp_path / "model.onnx"
    shutil.copy(tiny_model_path, served)
    with TestClient(create_app(Settings(model_path=served, warmup_runs=0))) as c:
        shutil.copy(tiny_rgb_model_path, served)  # a new build lands while the server runs
        body = c.get("/v1/cost").json()
        assert body["model"]["input_shape"] == [1, 1, 28, 28]
        profiled = c.get("/v1/cost", params={"profile": "true", "runs": 1})
        assert profiled.status_code == 409 and profiled.json()["error"] == "model_changed"
        assert "load the model again" in profiled.json()["detail"]
        name = body["model"]["name"]
        # Another input contract: refused as a new version; unloaded first, it loads.
        assert c.post(f"/v2/repository/models/{name}/load").status_code == 400
        assert c.post(f"/v2/repository/models/{name}/unload").status_code == 200
        assert c.post(f"/v2/repository/models/{name}/load").status_code == 200
        profiled = c.get("/v1/cost", params={"profile": "true", "runs": 1})
        assert profiled.status_code == 200
        assert profiled.json()["model"]["input_shape"] == [1, 3, 32, 32]
