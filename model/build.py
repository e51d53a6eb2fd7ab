"""The build pipeline: data -> network -> train [-> prune -> fine-tune] -> evaluate -> export ->
verify -> [int8] -> card.

:func:`build` runs the named stages in order; each is a function of what the stages before it
produced, so a test (or a sweep) can run one alone. The graph is verified in memory and each
model file is written once, with every figure of its metadata already measured.

Outputs in ``out``: ``model.onnx``, ``model.int8.onnx`` (with ``--int8``), ``model_card.json``,
``model_card.md``, ``build_config.json`` and the best checkpoint ``checkpoint.pt``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from model import card as card_mod
from model.data import FASHION_MNIST_LABELS, IMAGENET_MEAN, IMAGENET_STD, Split, load_data
from model.evaluate import evaluate, onnx_accuracy
from model.export import export_graph, with_build_info
from model.network import MobileNetV1
from model.quantize import int8_spec, quantize_graph
from model.recipes import BuildConfig
from model.train import (
    DRY_RUN_STEPS,
    fit,
    load_checkpoint,
    model_args,
    pick_device,
    save_checkpoint,
    seed_everything,
)
from model.verify import VerifyReport, ort_session, verify
from sepconv import preprocess
from sepconv.preprocess import Preprocessing
from sepconv.spec import ModelSpec, save_model

log = logging.getLogger("model.build")

#: Under ``--dry-run``: enough images for the few training batches and a quick test pass.
DRY_RUN_TEST_IMAGES = 256


@dataclass(frozen=True)
class Data:
    """What the network learns from: the splits (None without data), labels, preprocessing."""

    train: Split | None
    test: Split | None
    labels: list[str]
    pixels: Preprocessing
    name: str = ""
    fingerprint: str = ""


@dataclass
class Trained:
    net: nn.Module  # eval mode, on the CPU
    torch_accuracy: float | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    #: Epochs behind these weights, those of a starting checkpoint included.
    epochs: int = 0
    #: What pruning did (ratio, widths and parameters before and after, fine-tuning history).
    pruning: dict[str, Any] | None = None


@dataclass(frozen=True)
class Teaching:
    """A teacher's soft targets as the training objective (see :mod:`model.distill`)."""

    objective: Any
    teacher: str  # one line: which network taught
    logits: str  # "per-batch" (on the augmented batch) or "cached" (computed once)


@dataclass(frozen=True)
class Int8Result:
    path: Path | None = None
    accuracy: float | None = None


# --------------------------------------------------------------------------------- stages


def load_stage(config: BuildConfig) -> Data:
    """Read and prepare the data set, or describe the untrained network's input without one."""
    if config.data == "none":
        classes = config.classes or 1000
        rgb = config.color != "L"
        labels = (
            list(FASHION_MNIST_LABELS)
            if classes == 10 and not rgb
            else [f"class_{i}" for i in range(classes)]
        )
        pixels = Preprocessing(
            input_size=config.input_size,
            color_mode="RGB" if rgb else "L",
            mean=IMAGENET_MEAN if rgb else [0.5],
            std=IMAGENET_STD if rgb else [0.5],
        )
        return Data(None, None, labels, pixels)
    dataset = load_data(
        config.data,
        input_size=config.input_size,
        color_mode=config.color,
        fashion_dir=config.data_dir,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    if config.classes is not None and config.classes != len(dataset.labels):
        raise ValueError(
            f"--classes {config.classes} does not match the data, which has "
            f"{len(dataset.labels)} classes"
        )
    train_limit, test_limit = config.train_limit, config.test_limit
    if config.dry_run:
        train_limit = min(train_limit or 10**9, DRY_RUN_STEPS * config.batch_size)
        test_limit = min(test_limit or 10**9, DRY_RUN_TEST_IMAGES)
    return Data(
        train=dataset.train.subset(train_limit, config.seed),
        test=dataset.test.subset(test_limit, config.seed + 1),
        labels=dataset.labels,
        pixels=dataset.pixels,
        name=dataset.name,
        fingerprint=dataset.fingerprint,
    )


def start_stage(config: BuildConfig, data: Data) -> tuple[MobileNetV1 | None, int]:
    """The network ``init_checkpoint`` holds, and the epochs it was trained; (None, 0) without."""
    if config.init_checkpoint is None:
        return None, 0
    path = Path(config.init_checkpoint)
    if not path.is_file():
        raise ValueError(f"--init {path}: no such checkpoint")
    net, ckpt = load_checkpoint(path)
    args = ckpt["model_args"]
    if args["num_classes"] != len(data.labels) or args["in_channels"] != data.pixels.channels:
        raise ValueError(
            f"--init {path} has {args['num_classes']} classes and {args['in_channels']} input "
            f"channel(s); the data has {len(data.labels)} and {data.pixels.channels}"
        )
    log.info("starting from %s (epoch %s of its build)", path, ckpt.get("epoch"))
    return net, int(ckpt.get("config", {}).get("epochs", 0))


def teacher_stage(config: BuildConfig, data: Data) -> Teaching | None:
    """Open ``--teacher`` and make the distillation objective; None without a teacher."""
    if config.teacher is None:
        return None
    from model.distill import TeacherError, distillation_objective, load_teacher

    if data.train is None or (config.epochs == 0 and not (config.prune and config.prune_epochs)):
        raise ValueError("--teacher needs training data and epochs to train the student for")
    device = pick_device(config.device)
    try:
        teacher = load_teacher(config.teacher, data.pixels, data.labels, device)
    except TeacherError as exc:
        raise ValueError(str(exc)) from None
    objective, mode = distillation_objective(
        config,
        teacher,
        data.train,
        data.pixels,
        device,
        temperature=config.distill_temperature,
        weight=config.distill_weight,
    )
    return Teaching(objective, teacher.description, mode)


def train_stage(
    config: BuildConfig, data: Data, checkpoint: Path, teaching: Teaching | None = None
) -> Trained:
    """Train (keeping the best epoch), or build the untrained network and evaluate it as is.

    With ``init_checkpoint`` training continues from that network (its architecture kept);
    with a teacher the loss is the distillation objective.
    """
    start, start_epochs = start_stage(config, data)
    if data.train is not None and config.epochs > 0:
        result = fit(
            config,
            data.train,
            data.test,
            data.pixels,
            len(data.labels),
            checkpoint=checkpoint,
            net=start,
            objective=teaching.objective if teaching else None,
        )
        return Trained(
            net=result.net,
            torch_accuracy=result.best_accuracy,
            best_epoch=result.best_epoch,
            history=[dataclasses.asdict(h) for h in result.history],
            seconds=result.seconds,
            device=result.device,
            epochs=start_epochs + config.epochs,
        )
    net = start or MobileNetV1(**model_args(config, len(data.labels), data.pixels.channels))
    net.eval()
    return Trained(net=net, torch_accuracy=evaluate_stage(config, net, data), epochs=start_epochs)


def prune_stage(
    config: BuildConfig,
    data: Data,
    trained: Trained,
    checkpoint: Path,
    teaching: Teaching | None = None,
) -> Trained:
    """Remove ``config.prune`` of every layer's channels, then fine-tune (see :mod:`model.prune`).

    ``checkpoint`` afterwards holds the pruned network (its widths in the constructor
    arguments), so it always describes the exported model.
    """
    from model.prune import fine_tune_settings, prune_channels

    result = prune_channels(trained.net, config.prune, data.pixels.input_size)
    pruning: dict[str, Any] = {
        "ratio": config.prune,
        "widths_before": result.widths_before,
        "widths_after": result.widths_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "accuracy_before": trained.torch_accuracy,
        "fine_tune_epochs": 0,
        "history": [],
    }
    if data.train is not None and config.prune_epochs > 0:
        settings = fine_tune_settings(config)
        fitted = fit(
            config.model_copy(update=settings),
            data.train,
            data.test,
            data.pixels,
            len(data.labels),
            checkpoint=checkpoint,
            net=result.net,
            objective=teaching.objective if teaching else None,
        )
        pruning |= {
            "fine_tune_epochs": config.prune_epochs,
            "fine_tune_lr": settings["lr"],
            "history": [dataclasses.asdict(h) for h in fitted.history],
            "seconds": round(fitted.seconds, 1),
        }
        return dataclasses.replace(
            trained,
            net=fitted.net,
            torch_accuracy=fitted.best_accuracy,
            seconds=trained.seconds + fitted.seconds,
            device=fitted.device,
            epochs=trained.epochs + config.prune_epochs,
            pruning=pruning,
        )
    net = result.net.eval()
    accuracy = evaluate_stage(config, net, data)
    save_checkpoint(
        checkpoint,
        net.state_dict(),
        net.constructor_args(),
        trained.best_epoch,
        accuracy if accuracy is not None else float("nan"),
        config,
        pixels=data.pixels,
    )
    return dataclasses.replace(trained, net=net, torch_accuracy=accuracy, pruning=pruning)


def evaluate_stage(config: BuildConfig, net: nn.Module, data: Data) -> float | None:
    """PyTorch test accuracy (None without data); the network is left on the CPU."""
    if data.test is None:
        return None
    device = pick_device(config.device)
    _, accuracy = evaluate(net.to(device), data.test, data.pixels, device=device)
    net.cpu()
    return accuracy


def describe_stage(
    config: BuildConfig, data: Data, trained: Trained, teaching: Teaching | None = None
) -> ModelSpec:
    """The model's spec, everything but the measured accuracy.

    Architecture fields come from the network itself, so a network started from a checkpoint
    or pruned is described as it is, not as the settings would have built it.
    """
    net = trained.net
    spec = ModelSpec(
        **data.pixels.model_dump(),
        name=config.name,
        version=config.version,
        labels=data.labels,
        alpha=net.alpha,
        stem_stride=net.stem_stride,
        conv=net.conv,
        prune_ratio=config.prune,
        widths=net.widths if trained.pruning else None,
        teacher=teaching.teacher if teaching else "",
        recipe=config.recipe if trained.epochs > 0 else "untrained",
        epochs=trained.epochs,
        dataset=data.name,
        data_fingerprint=data.fingerprint,
    )
    return with_build_info(spec)


def export_stage(net: nn.Module, spec: ModelSpec) -> onnx.ModelProto:
    return export_graph(net, spec)


def verify_stage(
    config: BuildConfig, graph: onnx.ModelProto, trained: Trained, data: Data
) -> VerifyReport:
    """ONNX Runtime against PyTorch on the in-memory graph, and test accuracy through ORT."""
    report = verify(
        graph.SerializeToString(),
        trained.net,
        data.pixels,
        data.test,
        torch_accuracy=trained.torch_accuracy,
        batch_size=config.eval_batch_size,
    )
    log.info(
        "verify: max |ORT - PyTorch| = %.2e on %s; ORT test accuracy %s",
        report.max_abs_diff,
        report.compared_on,
        report.onnx_accuracy,
    )
    return report


def int8_stage(
    config: BuildConfig, graph: onnx.ModelProto, spec: ModelSpec, data: Data, out: Path
) -> Int8Result:
    """INT8 static quantization calibrated on training images, measured on the test set."""
    rng = np.random.default_rng(config.seed)
    pixels = data.pixels
    if data.train is not None:
        idx = np.sort(rng.permutation(len(data.train))[: config.calibration_size])
        calibration = preprocess.normalize(data.train.images[idx], pixels)
    else:
        # No data: the calibration ranges are those of standardised inputs; fine for a cost
        # analysis of an untrained network, meaningless for accuracy.
        shape = (
            min(config.calibration_size, 32),
            pixels.channels,
            pixels.input_size,
            pixels.input_size,
        )
        calibration = rng.standard_normal(shape).astype(np.float32)
    quantized = quantize_graph(graph, spec, calibration)
    accuracy = None
    if data.test is not None:
        accuracy = onnx_accuracy(
            ort_session(quantized.SerializeToString()),
            data.test,
            pixels,
            batch_size=config.eval_batch_size,
            desc="onnxruntime int8",
        )
    path = save_model(quantized, int8_spec(spec, accuracy), out / "model.int8.onnx")
    log.info("int8: %s, ORT test accuracy %s", path, accuracy)
    return Int8Result(path, accuracy)


def card_stage(
    out: Path,
    config: BuildConfig,
    spec: ModelSpec,
    data: Data,
    trained: Trained,
    report: VerifyReport,
    int8: Int8Result,
    started: float,
    teaching: Teaching | None = None,
) -> tuple[Path, Path]:
    optimization = {
        "conv": spec.conv,
        "pruning": trained.pruning,
        "distillation": {
            "teacher": teaching.teacher,
            "teacher_path": config.teacher,
            "temperature": config.distill_temperature,
            "weight": config.distill_weight,
            "teacher_logits": teaching.logits,
        }
        if teaching
        else None,
        "init_checkpoint": config.init_checkpoint,
    }
    results = {
        "verified": report.ok,
        "problems": report.problems,
        "max_abs_diff": report.max_abs_diff,
        "compared_on": report.compared_on,
        "tolerance": report.tolerance,
        "torch_accuracy": trained.torch_accuracy,
        "onnx_accuracy": report.onnx_accuracy,
        "int8_path": str(int8.path) if int8.path else None,
        "int8_accuracy": int8.accuracy,
        "best_epoch": trained.best_epoch,
        "train_seconds": round(trained.seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    card = {
        "spec": spec.model_dump(),
        "config": config.model_dump(),
        "results": results,
        "history": trained.history,
        "optimization": optimization,
        "parameters": sum(p.numel() for p in trained.net.parameters() if p.requires_grad),
        "train_images": len(data.train) if data.train is not None else 0,
        "test_images": len(data.test) if data.test is not None else 0,
        "device": _describe_device(trained.device),
        "versions": card_mod.versions(),
    }
    return card_mod.write_card(out, card)


def _describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} thread(s))"


# ------------------------------------------------------------------------------- pipeline


def build(config: BuildConfig, out: Path) -> int:
    """Run every stage; returns the process exit code (1 when verification fails)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "build_config.json").write_text(config.to_json())
    log.info(
        "recipe %s: alpha %g %s, %d px, %d epoch(s), data %s; all settings in %s",
        config.recipe,
        config.alpha,
        config.conv,
        config.input_size,
        config.epochs,
        config.data,
        out / "build_config.json",
    )
    seed_everything(config.seed)

    data = load_stage(config)
    teaching = teacher_stage(config, data)
    trained = train_stage(config, data, out / "checkpoint.pt", teaching)
    if config.prune > 0:
        trained = prune_stage(config, data, trained, out / "checkpoint.pt", teaching)
    spec = describe_stage(config, data, trained, teaching)
    graph = export_stage(trained.net, spec)
    report = verify_stage(config, graph, trained, data)
    spec = spec.model_copy(update={"test_accuracy": report.onnx_accuracy})
    model_path = save_model(graph, spec, out / "model.onnx")
    int8 = Int8Result()
    if config.int8 and report.ok:
        int8 = int8_stage(config, graph, spec, data, out)
    json_path, md_path = card_stage(
        out, config, spec, data, trained, report, int8, started, teaching
    )
    log.info(
        "wrote %s, %s, %s in %.1f s", model_path, json_path, md_path, time.perf_counter() - started
    )
    if not report.ok:
        for problem in report.problems:
            log.error("verification failed: %s", problem)
        return 1
    return 0
