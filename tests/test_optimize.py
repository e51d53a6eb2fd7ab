"""What the optimisations do to the graph: standard convs, pruning, distillation; on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

from model.distill import (
    OnnxTeacher,
    TeacherError,
    distillation_loss,
    distillation_objective,
    load_teacher,
    teacher_logits_mode,
)
from model.export import export_onnx
from model.network import MobileNetV1, layer_widths
from model.prune import prune_channels
from model.recipes import resolve
from model.train import fit, load_checkpoint
from model.verify import ort_session
from sepconv.cost import LayerKind, analyze_model
from sepconv.spec import ModelSpec

from .test_data import make_folder

LABELS = ["circle", "square", "cross"]


def _spec(size: int, color: str = "L", alpha: float = 0.25, stem: int = 1) -> ModelSpec:
    ch = 1 if color == "L" else 3
    return ModelSpec(labels=LABELS, input_size=size, color_mode=color, mean=[0.5] * ch,
                     std=[0.25] * ch, alpha=alpha, stem_stride=stem)  # fmt: skip


def _trained_like(net: MobileNetV1, size: int, seed: int = 0) -> MobileNetV1:
    """Non-trivial BN statistics, as after training, so folding is not an identity."""
    torch.manual_seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(8, net.features[0][0].in_channels, size, size))
    return net.eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from model.data import load_image_folder

    folder = make_folder(tmp_path_factory.mktemp("imgs") / "shapes", per_class=10)
    return load_image_folder(folder, input_size=16, seed=0)


# ------------------------------------------------------------------------------ standard conv


@pytest.mark.parametrize("alpha, size, color, stem", [(0.25, 28, "L", 1), (0.75, 40, "RGB", 2)])
def test_standard_conv_costs_exactly_the_separable_networks_full_conv_figure(
    tmp_path, alpha, size, color, stem
):
    ch = 1 if color == "L" else 3
    reports = {}
    for conv in ("separable", "standard"):
        net = MobileNetV1(len(LABELS), ch, alpha, stem, conv=conv)
        path = export_onnx(_trained_like(net, size), _spec(size, color, alpha, stem),
                           tmp_path / f"{conv}.onnx")  # fmt: skip
        reports[conv] = analyze_model(path)
    sep, std = reports["separable"], reports["standard"]
    assert len(sep.separable_pairs) == 13 and std.separable_pairs == []
    assert std.totals.mult_adds == sep.totals.full_conv_mult_adds
    assert std.totals.params == sep.totals.full_conv_params
    assert std.totals.mult_adds > 7 * sep.totals.mult_adds  # the 8-9x the paper claims
    kinds = [layer.kind for layer in std.layers]
    assert kinds == [LayerKind.STANDARD] * 14 + [LayerKind.FULLY_CONNECTED]
    assert [layer.output_channels for layer in std.layers[:14]] == layer_widths(alpha)


def test_conv_and_widths_arguments_are_checked():
    with pytest.raises(ValueError, match="conv must be one of"):
        MobileNetV1(conv="grouped")
    with pytest.raises(ValueError, match="widths needs 14"):
        MobileNetV1(widths=[8, 16])
    plain = MobileNetV1(10, 1, 0.25, 1)
    assert "conv" not in plain.constructor_args() and "widths" not in plain.constructor_args()
    assert MobileNetV1(10, 1, 0.25, 1, conv="standard").constructor_args()["conv"] == "standard"


# ------------------------------------------------------------------------------------ pruning


@pytest.mark.parametrize("conv", ["separable", "standard"])
def test_pruning_removes_channels_physically_and_ort_runs_fewer_mult_adds(tmp_path, conv):
    net = _trained_like(MobileNetV1(len(LABELS), 1, 0.5, 1, conv=conv), 28)
    result = prune_channels(net, 0.5, 28)
    pruned = result.net
    assert result.widths_before == layer_widths(0.5) == net.widths  # the input is left alone
    assert result.widths_after == [w // 2 for w in layer_widths(0.5)]
    assert result.params_after < result.params_before
    # Every coupled layer was pruned with its producer: depthwise groups follow the channels.
    for module in pruned.modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
            assert module.groups == module.in_channels == module.out_channels
    # The pruned widths rebuild the same network from a state dict (what a checkpoint holds).
    rebuilt = MobileNetV1(**pruned.constructor_args())
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))

    full = export_onnx(net, _spec(28, alpha=0.5), tmp_path / "full.onnx")
    small = export_onnx(pruned, _spec(28, alpha=0.5), tmp_path / "pruned.onnx")
    onnx.checker.check_model(onnx.load(str(small)), full_check=True)
    (got,) = ort_session(small).run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(x).numpy(), atol=1e-4)
    before, after = analyze_model(full), analyze_model(small)
    # Halving every width quarters the 1x1 and standard convs' mult-adds, halves the depthwise.
    assert after.totals.mult_adds < 0.3 * before.totals.mult_adds
    assert after.totals.params < before.totals.params
    widths = [layer.output_channels for layer in after.layers[:-1]]
    if conv == "separable":
        assert widths[0] == result.widths_after[0] and widths[2::2] == result.widths_after[1:]
        assert len(after.separable_pairs) == 13 and all(p.agrees for p in after.separable_pairs)
    else:
        assert widths == result.widths_after


def test_pruning_rejects_bad_ratios():
    net = MobileNetV1(3, 1, 0.25, 1)
    for ratio in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"prune ratio must be in \(0, 1\)"):
            prune_channels(net, ratio, 16)
    # Torch-Pruning removes at least one channel of every layer, however small the ratio.
    assert prune_channels(net, 0.001, 16).widths_after == [w - 1 for w in net.widths]


def test_fine_tuning_a_pruned_network_keeps_its_widths_in_the_checkpoint(dataset, tmp_path):
    cfg = resolve("smoke", overrides={"epochs": 1, "batch_size": 8, "dry_run": True,
                                      "input_size": 16})  # fmt: skip
    net = MobileNetV1(3, 3, 0.25, 1)
    pruned = prune_channels(net, 0.5, 16).net
    ckpt = tmp_path / "checkpoint.pt"
    result = fit(cfg, dataset.train, dataset.test, dataset.pixels, 3, checkpoint=ckpt, net=pruned)
    assert result.net.widths == pruned.widths and result.model_args["widths"] == pruned.widths
    rebuilt, meta = load_checkpoint(ckpt)
    assert rebuilt.widths == pruned.widths and meta["pixels"]["input_size"] == 16
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.net(x))


# ------------------------------------------------------------------------------- distillation


def test_distillation_loss_against_hand_computed_values():
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    ce = F.cross_entropy(student, y)
    # weight 0: only the hard labels count
    assert torch.allclose(distillation_loss(student, teacher, y, temperature=4, weight=0.0), ce)
    # identical logits: the soft term is exactly zero at any temperature
    assert distillation_loss(teacher, teacher, y, temperature=3, weight=1.0).abs() < 1e-7
    # weight 1, T = 2: T^2 * mean over the batch of KL(p_teacher || p_student) at T
    t = 2.0

    def kl(s, q):
        ps, pt = F.softmax(s / t, 0), F.softmax(q / t, 0)
        return float((pt * (pt.log() - ps.log())).sum())

    expected = t * t * (kl(student[0], teacher[0]) + kl(student[1], teacher[1])) / 2
    got = distillation_loss(student, teacher, y, temperature=t, weight=1.0)
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # the mix is linear in the weight
    mixed = distillation_loss(student, teacher, y, temperature=t, weight=0.25)
    assert math.isclose(float(mixed), 0.25 * expected + 0.75 * float(ce), rel_tol=1e-5)
    # the teacher gets no gradient; the student is pulled towards the teacher's answer
    s = student.clone().requires_grad_()
    tt = teacher.clone().requires_grad_()
    distillation_loss(s, tt, y, temperature=t, weight=1.0).backward()
    assert tt.grad is None and s.grad[0, 1] < 0 < s.grad[0, 0]
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, y, temperature=0, weight=0.5)
    with pytest.raises(ValueError, match="weight"):
        distillation_loss(student, teacher, y, temperature=1, weight=1.5)


def _teacher_files(tmp_path: Path, dataset) -> tuple[Path, Path]:
    """The same teacher as a checkpoint and as an ONNX export, with clearly input-dependent
    logits (a freshly initialised classifier answers almost 0 for everything)."""
    from model.train import save_checkpoint

    net = _trained_like(MobileNetV1(3, 3, 0.5, 1), 16)
    with torch.no_grad():
        torch.nn.init.normal_(net.classifier.weight, 0.0, 1.0)
    ckpt = tmp_path / "teacher.pt"
    cfg = resolve("smoke", overrides={"input_size": 16, "alpha": 0.5})
    save_checkpoint(ckpt, net.state_dict(), net.constructor_args(), 1, 0.5, cfg,
                    pixels=dataset.pixels)  # fmt: skip
    px = dataset.pixels
    spec = ModelSpec(labels=dataset.labels, input_size=16, color_mode=px.color_mode,
                     mean=px.mean, std=px.std, alpha=0.5, stem_stride=1)  # fmt: skip
    return ckpt, export_onnx(net, spec, tmp_path / "teacher.onnx")


def test_teachers_from_a_checkpoint_and_from_onnx_agree_and_are_checked(dataset, tmp_path):
    ckpt, onnx_path = _teacher_files(tmp_path, dataset)
    cpu = torch.device("cpu")
    from_ckpt = load_teacher(ckpt, dataset.pixels, dataset.labels, cpu)
    from_onnx = load_teacher(onnx_path, dataset.pixels, dataset.labels, cpu)
    assert isinstance(from_onnx, OnnxTeacher) and from_ckpt.kind == "checkpoint"
    x = torch.randn(5, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(from_onnx.logits(x), from_ckpt.logits(x), atol=1e-4, rtol=1e-4)

    other_size = dataset.pixels.model_copy(update={"input_size": 24})
    for path in (ckpt, onnx_path):
        with pytest.raises(TeacherError, match="input size 16 px, the student's is 24"):
            load_teacher(path, other_size, dataset.labels, cpu)
    with pytest.raises(TeacherError, match="class order"):
        load_teacher(onnx_path, dataset.pixels, ["a", "b", "c"], cpu)
    with pytest.raises(TeacherError, match="has 3 classes, the student 4"):
        load_teacher(ckpt, dataset.pixels, ["a", "b", "c", "d"], cpu)
    with pytest.raises(TeacherError, match="no such file"):
        load_teacher(tmp_path / "nope.onnx", dataset.pixels, dataset.labels, cpu)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="neither an ONNX model nor a readable checkpoint"):
        load_teacher(junk, dataset.pixels, dataset.labels, cpu)


def test_teacher_logits_are_cached_only_without_augmentation(dataset, tmp_path):
    ckpt, onnx_path = _teacher_files(tmp_path, dataset)
    cpu = torch.device("cpu")
    teacher = load_teacher(onnx_path, dataset.pixels, dataset.labels, cpu)
    flips = resolve("smoke", overrides={"input_size": 16})
    plain = resolve("smoke", overrides={"input_size": 16, "hflip": False})
    kd = {"temperature": 2.0, "weight": 0.5}
    assert teacher_logits_mode(flips) == "per-batch" and teacher_logits_mode(plain) == "cached"
    for cfg in (flips, plain):
        objective, mode = distillation_objective(
            cfg, teacher, dataset.train, dataset.pixels, cpu, **kd
        )
        assert mode == teacher_logits_mode(cfg)
        idx = np.array([3, 0, 5])
        from model.evaluate import to_input

        x = to_input(dataset.train.images[idx], dataset.pixels)
        y = torch.from_numpy(dataset.train.labels[idx])
        student = torch.randn(3, 3)
        expected = distillation_loss(student, teacher.logits(x), y, temperature=2.0,
                                     weight=0.5, label_smoothing=cfg.label_smoothing)  # fmt: skip
        # Same images: cached and per-batch give the same loss...
        torch.testing.assert_close(objective(student, y, x, idx), expected)
    # ...but a cached objective ignores the batch it is handed (it is only right unaugmented),
    # while a per-batch one runs the teacher on whatever augmented batch the student saw.
    torch.manual_seed(0)
    augmented = x + 2 * torch.randn_like(x)
    per_batch, _ = distillation_objective(flips, teacher, dataset.train, dataset.pixels, cpu, **kd)
    cached, _ = distillation_objective(plain, teacher, dataset.train, dataset.pixels, cpu, **kd)
    assert not torch.allclose(
        per_batch(student, y, augmented, idx), cached(student, y, augmented, idx)
    )


# ------------------------------------------------------------------------ through the build CLI


def _build(*argv: str) -> int:
    from model import cli

    return cli.main(["build", *argv])


def test_cli_prunes_and_distils_and_every_report_says_so(tmp_path):
    folder = make_folder(tmp_path / "shapes", per_class=10)
    common = ("--data", str(folder), "--recipe", "smoke", "--input-size", "16", "--dry-run")
    teacher, base, student = tmp_path / "teacher", tmp_path / "base", tmp_path / "student"
    assert _build(*common, "--conv", "standard", "--out", str(teacher)) == 0
    assert _build(*common, "--epochs", "1", "--out", str(base)) == 0
    # Prune the finished build's checkpoint (no training from scratch), fine-tune it against
    # the standard-conv teacher's ONNX export.
    assert _build(*common, "--init", str(base / "checkpoint.pt"), "--epochs", "0",
                  "--prune", "0.5", "--prune-epochs", "1",
                  "--teacher", str(teacher / "model.onnx"), "--distill-temperature", "3",
                  "--out", str(student)) == 0  # fmt: skip

    from sepconv.spec import read_spec

    assert read_spec(teacher / "model.onnx").conv == "standard"
    spec = read_spec(student / "model.onnx")
    full = layer_widths(0.25)
    assert spec.prune_ratio == 0.5 and spec.widths == [w // 2 for w in full]
    assert "teacher/model.onnx" in spec.teacher and spec.recipe == "smoke" and spec.epochs == 2
    card = json.loads((student / "model_card.json").read_text())
    opt = card["optimization"]
    assert opt["pruning"]["widths_before"] == full and opt["pruning"]["fine_tune_epochs"] == 1
    assert opt["distillation"]["temperature"] == 3 and opt["distillation"]["weight"] == 0.9
    assert opt["distillation"]["teacher_logits"] == "per-batch"  # the smoke recipe flips
    assert card["results"]["verified"]
    md = (student / "model_card.md").read_text()
    assert "| Pruning | 50% of every layer's output channels removed" in md
    assert "| Distillation | from " in md and "Fine-tuning after pruning" in md
    # The checkpoint is the pruned network, so it rebuilds what was exported.
    net, _ = load_checkpoint(student / "checkpoint.pt")
    assert net.widths == spec.widths
    # The cost report's per-layer table shows the pruned widths and the paper's layer names.
    report = analyze_model(student / "model.onnx")
    assert report.layers[0].name == "stem" and report.layers[0].output_channels == full[0] // 2
    pointwise = [layer for layer in report.layers if layer.kind == LayerKind.POINTWISE]
    assert [layer.output_channels for layer in pointwise] == spec.widths[1:]
    assert analyze_model(base / "model.onnx").totals.mult_adds > 3 * report.totals.mult_adds
    std = analyze_model(teacher / "model.onnx")
    assert [layer.name for layer in std.layers][:3] == ["stem", "block1.conv", "block2.conv"]

    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_path=student / "model.onnx", warmup_runs=1))
    with TestClient(app) as client:
        body = client.get("/v1/models").json()
    assert body["optimization"]["prune_ratio"] == 0.5
    assert body["optimization"]["widths"] == spec.widths
    assert body["optimization"]["teacher"] == spec.teacher
    assert body["optimization"]["conv"] == "separable"


def test_cli_refuses_unusable_optimisation_settings(tmp_path, capsys):
    folder = make_folder(tmp_path / "shapes", per_class=4)
    common = ("--data", str(folder), "--recipe", "smoke", "--input-size", "16", "--dry-run",
              "--out", str(tmp_path / "out"))  # fmt: skip
    assert _build(*common, "--prune", "1.0") == 2
    assert "prune" in capsys.readouterr().err
    assert _build(*common, "--teacher", str(tmp_path / "none.onnx")) == 2
    assert "none.onnx: no such file" in capsys.readouterr().err
    assert _build(*common, "--init", str(tmp_path / "none.pt"), "--epochs", "0") == 2
    assert "none.pt: no such checkpoint" in capsys.readouterr().err
    assert _build(*common, "--distill-weight", "2") == 2
    assert "distill_weight" in capsys.readouterr().err
