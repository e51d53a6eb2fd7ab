"""The build: recipes, augmentation, a few-batch training run, export + verify, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model import cli
from model.data import FASHION_MNIST_DIR, Split, load_image_folder
from model.export import export_onnx
from model.recipes import resolve
from model.train import augment, fit, load_checkpoint
from model.verify import TOLERANCE, verify
from sepconv.preprocess import Preprocessing
from sepconv.spec import ModelSpec, read_spec

from .test_data import make_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs") / "shapes", per_class=10)


@pytest.fixture(scope="module")
def dataset(folder):
    return load_image_folder(folder, input_size=16, seed=0)


def run_cli(*argv: str) -> int:
    return cli.main(["build", *argv])


# ------------------------------------------------------------------------------------ recipes


def test_recipe_then_config_file_then_flags(tmp_path):
    assert resolve("smoke").alpha == 0.25 and resolve("quick").recipe == "quick"
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"alpha": 0.75, "epochs": 9}))
    cfg = resolve("smoke", cfg_file, {"epochs": 2, "lr": None})
    assert (cfg.alpha, cfg.epochs, cfg.lr) == (0.75, 2, resolve("smoke").lr)
    assert cfg.resolved_stem_stride() == 1
    assert resolve("quick", overrides={"input_size": 224}).resolved_stem_stride() == 2
    cfg_file.write_text(json.dumps({"alpah": 0.5}))
    with pytest.raises(ValueError, match="unknown setting.*alpah"):
        resolve("quick", cfg_file)
    with pytest.raises(ValueError, match="alpha must be in"):
        resolve("quick", overrides={"alpha": 2.0})
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve("huge")


# ------------------------------------------------------------------------------- augmentation


def test_augment_is_seeded_pads_with_black_and_flips():
    cfg = resolve("full", overrides={"channels_last": False})
    x = torch.randn(64, 1, 8, 8)
    fill = torch.tensor([-2.0])
    a = augment(x, cfg, fill, torch.Generator().manual_seed(1))
    b = augment(x, cfg, fill, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment(x, cfg, fill, torch.Generator().manual_seed(2)))
    # Only padding brings in the black-pixel value; erasing writes the mean (0).
    assert (a == -2.0).any() and (a == 0.0).any()
    flip_only = resolve("quick", overrides={"crop_padding": 0, "channels_last": False})
    out = augment(x, flip_only, fill, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 0 < sum(flipped) < 64


# ----------------------------------------------------------------------------------- training


def test_few_batch_training_dry_run_keeps_a_rebuildable_checkpoint(dataset, tmp_path):
    cfg = resolve("quick", overrides={"alpha": 0.25, "epochs": 2, "batch_size": 8,
                                      "dry_run": True, "input_size": 16})  # fmt: skip
    ckpt = tmp_path / "checkpoint.pt"
    result = fit(cfg, dataset.train, dataset.test, dataset.pixels, 3, checkpoint=ckpt)
    assert [h.epoch for h in result.history] == [1, 2]
    assert all(np.isfinite(h.train_loss) and h.images_per_second > 0 for h in result.history)
    assert result.best_accuracy == max(h.test_accuracy for h in result.history)
    net, meta = load_checkpoint(ckpt)
    assert meta["model_args"] == {"num_classes": 3, "in_channels": 3, "alpha": 0.25,
                                  "stem_stride": 1, "dropout": 0.0}  # fmt: skip
    assert meta["epoch"] == result.best_epoch
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), result.net(x))
    # Same seed, same weights: the run is reproducible.
    again = fit(cfg, dataset.train, dataset.test, dataset.pixels, 3)
    with torch.no_grad():
        assert torch.equal(again.net(x), result.net(x))


# ----------------------------------------------------------------------------- export, verify


def _tiny_export(tmp_path: Path, pixels: Preprocessing, labels: list[str]):
    torch.manual_seed(0)
    from model.network import MobileNetV1

    net = MobileNetV1(num_classes=len(labels), in_channels=pixels.channels, alpha=0.25,
                      stem_stride=1)  # fmt: skip
    with torch.no_grad():  # non-trivial BN statistics
        net.train()(torch.randn(16, pixels.channels, pixels.input_size, pixels.input_size))
    net.eval()
    spec = ModelSpec(labels=labels, input_size=pixels.input_size, color_mode=pixels.color_mode,
                     mean=pixels.mean, std=pixels.std, alpha=0.25, stem_stride=1)  # fmt: skip
    return net, export_onnx(net, spec, tmp_path / "model.onnx")


def test_export_and_verify_tiny_network(dataset, tmp_path):
    net, path = _tiny_export(tmp_path, dataset.pixels, dataset.labels)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    report = verify(path, net, dataset.pixels, dataset.test, torch_accuracy=None)
    assert report.ok and report.max_abs_diff <= TOLERANCE
    assert report.compared_on == f"{len(dataset.test)} test images"
    from model.evaluate import evaluate

    _, torch_acc = evaluate(net, dataset.test, dataset.pixels, device=torch.device("cpu"))
    assert report.onnx_accuracy == pytest.approx(torch_acc)
    # The check can fail: a network that is not the exported one is caught.
    with torch.no_grad():
        net.classifier.bias += 0.01
    bad = verify(path, net, dataset.pixels, dataset.test, torch_accuracy=torch_acc)
    assert not bad.ok and "differ by up to" in bad.problems[0]
    wrong_acc = verify(path, net, dataset.pixels, None, torch_accuracy=0.1)
    assert wrong_acc.onnx_accuracy is None and "random" in wrong_acc.compared_on


# ---------------------------------------------------------------------------------------- CLI


def test_cli_builds_from_an_image_folder_with_int8(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli("--data", str(folder), "--recipe", "smoke", "--input-size", "16",
                   "--epochs", "1", "--dry-run", "--int8", "--out", str(out))  # fmt: skip
    assert code == 0
    spec = read_spec(str(out / "model.onnx"))
    card = json.loads((out / "model_card.json").read_text())
    assert spec.labels == ["bar", "circle", "square"] and spec.input_size == 16
    assert spec.recipe == "smoke" and spec.stem_stride == 1 and spec.dataset == "folder:shapes"
    assert spec.test_accuracy == card["results"]["onnx_accuracy"]
    assert spec.data_fingerprint == card["spec"]["data_fingerprint"] and spec.build_date
    assert card["results"]["verified"] and card["results"]["max_abs_diff"] <= TOLERANCE
    assert card["parameters"] > 0 and card["versions"]["torch"].startswith("2.13")
    int8 = read_spec(str(out / "model.int8.onnx"))
    assert int8.precision == "int8" and int8.test_accuracy == card["results"]["int8_accuracy"]
    config = json.loads((out / "build_config.json").read_text())
    assert config["recipe"] == "smoke" and config["input_size"] == 16 and config["dry_run"]
    md = (out / "model_card.md").read_text()
    assert "Test accuracy, ONNX Runtime |" in md and "INT8" in md and "passed" in md
    assert (out / "checkpoint.pt").is_file()


def test_cli_full_recipe_one_step_cpu_dry_run(folder, tmp_path):
    out = tmp_path / "full"
    assert run_cli("--recipe", "full", "--data", str(folder), "--input-size", "16",
                   "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--dry-run",
                   "--device", "cpu",
                   "--out", str(out)) == 0  # fmt: skip
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["optimizer"] == "sgd" and card["config"]["erase_prob"] > 0
    assert card["spec"]["alpha"] == 1.0 and card["results"]["verified"]


def test_cli_epochs_0_exports_the_papers_network_without_data(tmp_path):
    out = tmp_path / "paper"
    assert run_cli("--epochs", "0", "--alpha", "0.25", "--data-dir", "/nonexistent",
                   "--out", str(out)) == 0  # fmt: skip
    spec = read_spec(str(out / "model.onnx"))
    assert (spec.input_size, spec.color_mode, spec.stem_stride) == (224, "RGB", 2)
    assert spec.num_classes == 1000 and spec.labels[999] == "class_999"
    assert spec.mean == [0.485, 0.456, 0.406] and spec.recipe == "untrained"
    assert spec.test_accuracy is None and spec.data_fingerprint == ""
    card = json.loads((out / "model_card.json").read_text())
    assert card["results"]["verified"] and "random" in card["results"]["compared_on"]


def test_cli_errors_exit_2_with_a_message(folder, tmp_path, capsys):
    assert run_cli("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    assert run_cli("--data", str(folder), "--classes", "5", "--out", str(tmp_path)) == 2
    assert "does not match the data, which has 3 classes" in capsys.readouterr().err
    assert run_cli("--alpha", "1.5", "--out", str(tmp_path)) == 2
    assert "alpha must be in (0, 1]" in capsys.readouterr().err


def test_cli_exits_1_when_verification_fails(folder, tmp_path, monkeypatch):
    monkeypatch.setattr("model.verify.max_logit_difference", lambda *a: 0.5)
    out = tmp_path / "bad"
    assert run_cli("--data", str(folder), "--recipe", "smoke", "--input-size", "16",
                   "--dry-run", "--out", str(out)) == 1  # fmt: skip
    card = json.loads((out / "model_card.json").read_text())
    assert not card["results"]["verified"] and "FAILED" in (out / "model_card.md").read_text()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_cli_smoke_dry_run_on_fashion_mnist(tmp_path):
    out = tmp_path / "fm"
    assert run_cli("--recipe", "smoke", "--dry-run", "--out", str(out)) == 0
    spec = read_spec(str(out / "model.onnx"))
    assert spec.labels[0] == "T-shirt/top" and (spec.input_size, spec.color_mode) == (28, "L")
    assert spec.mean == pytest.approx([0.286], abs=1e-3) and len(spec.data_fingerprint) == 64


def test_cost_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["cost", "--help"])
    assert info.value.code == 0 and "MODEL" in capsys.readouterr().out.upper()


def test_split_subset_is_seeded():
    split = Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), np.arange(100))
    a, b = split.subset(10, 0), split.subset(10, 0)
    assert len(a) == 10 and np.array_equal(a.labels, b.labels)
    assert split.subset(None, 0) is split
