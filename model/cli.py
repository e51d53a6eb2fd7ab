"""``python -m model build ...`` (also ``sepconv-build``) and ``python -m model cost ...``.

The build runs data -> network -> train -> evaluate -> export -> verify [-> int8] and writes
``OUT/model.onnx``, ``OUT/model_card.json``, ``OUT/model_card.md``, ``OUT/build_config.json``
and the best checkpoint ``OUT/checkpoint.pt``. It exits 1 when verification fails and 2 when
the data or the settings are unusable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

from model.recipes import RECIPES, BuildConfig, resolve

log = logging.getLogger("model.build")

#: With ``--epochs 0`` and no ``--data``, nothing is read and the network is the paper's
#: ImageNet one unless flags say otherwise.
PAPER_DEFAULTS = {"alpha": 1.0, "input_size": 224, "classes": 1000, "color": "RGB"}
#: Under ``--dry-run``: enough images for the few training batches and a quick test pass.
DRY_RUN_TEST_IMAGES = 256


def _add_build_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to build")
    g.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="quick",
        help="named defaults: quick (CPU, minutes), full (GPU), smoke (seconds)",
    )
    g.add_argument(
        "--config",
        type=Path,
        help="JSON settings applied over the recipe, e.g. "
        "a previous build_config.json; flags still win",
    )
    g.add_argument("--out", type=Path, default=Path("artifacts"), help="output directory")
    g.add_argument("--alpha", type=float, help="width multiplier in (0, 1]")
    g.add_argument("--input-size", type=int, help="square input side in pixels")
    g.add_argument(
        "--stem-stride",
        type=int,
        choices=(1, 2),
        help="stride of the first conv (default: 1 up to 64 px, else 2)",
    )
    g.add_argument("--classes", type=int, help="number of classes (must match the data)")
    g.add_argument("--name", help="model name in the metadata")
    g.add_argument("--version", help="model version in the metadata")
    g.add_argument(
        "--int8",
        action="store_true",
        default=None,
        help="also write model.int8.onnx (static quantization) and measure it",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data", help="fashion-mnist (default) or an image folder: one subfolder per class"
    )
    d.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files")
    d.add_argument(
        "--color",
        choices=("L", "RGB"),
        help="colour mode (default: L for Fashion-MNIST or an all-greyscale folder)",
    )
    d.add_argument(
        "--test-fraction", type=float, help="held-out share of an image folder (default 0.2)"
    )
    d.add_argument("--train-limit", type=int, help="train on a seeded subset of this size")
    d.add_argument("--test-limit", type=int, help="test on a seeded subset of this size")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="0 exports an untrained network")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--optimizer", choices=("adamw", "sgd"))
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=("onecycle", "cosine"))
    t.add_argument("--label-smoothing", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help=f"train a few batches, test on {DRY_RUN_TEST_IMAGES} images (CI smoke)",
    )


def _overrides(args: argparse.Namespace) -> dict:
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    return {k: v for k, v in vars(args).items() if k in fields and k != "recipe"}


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    overrides = _overrides(args)
    config = resolve(args.recipe, args.config, overrides)
    if config.epochs == 0 and args.data is None:
        paper = {k: v for k, v in PAPER_DEFAULTS.items() if overrides.get(k) is None}
        config = resolve(args.recipe, args.config, overrides | paper | {"data": "none"})
    return config


def build(config: BuildConfig, out: Path) -> int:
    """Run the whole build; returns the process exit code."""
    import torch

    from model import card as card_mod
    from model.data import FASHION_MNIST_LABELS, IMAGENET_MEAN, IMAGENET_STD, PixelSpec, load_data
    from model.evaluate import evaluate
    from model.export import export_onnx
    from model.network import MobileNetV1
    from model.train import fit, model_args, pick_device, seed_everything
    from model.verify import verify
    from service.spec import ModelSpec

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "build_config.json").write_text(config.to_json())
    log.info(
        "recipe %s: alpha %g, %d px, %d epoch(s), data %s; all settings in %s",
        config.recipe,
        config.alpha,
        config.input_size,
        config.epochs,
        config.data,
        out / "build_config.json",
    )
    seed_everything(config.seed)

    dataset = None
    if config.data != "none":
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
            from model.train import DRY_RUN_STEPS

            train_limit = min(train_limit or 10**9, DRY_RUN_STEPS * config.batch_size)
            test_limit = min(test_limit or 10**9, DRY_RUN_TEST_IMAGES)
        train = dataset.train.subset(train_limit, config.seed)
        test = dataset.test.subset(test_limit, config.seed + 1)
        labels, pixels = dataset.labels, dataset.pixels
        name, fingerprint = dataset.name, dataset.fingerprint
    else:
        train = test = None
        classes = config.classes or 1000
        labels = (
            list(FASHION_MNIST_LABELS)
            if classes == 10 and config.color == "L"
            else [f"class_{i}" for i in range(classes)]
        )
        rgb = config.color != "L"
        pixels = PixelSpec(
            input_size=config.input_size,
            color_mode="RGB" if rgb else "L",
            mean=IMAGENET_MEAN if rgb else [0.5],
            std=IMAGENET_STD if rgb else [0.5],
        )
        name, fingerprint = "", ""

    torch_acc, history, best_epoch, train_seconds, device = None, [], 0, 0.0, "cpu"
    if train is not None and config.epochs > 0:
        result = fit(config, train, test, pixels, len(labels), checkpoint=out / "checkpoint.pt")
        net, torch_acc, best_epoch = result.net, result.best_accuracy, result.best_epoch
        history = [dataclasses.asdict(h) for h in result.history]
        train_seconds, device = result.seconds, result.device
    else:
        net = MobileNetV1(**model_args(config, len(labels), pixels.channels)).eval()
        if test is not None:
            dev = pick_device(config.device)
            _, torch_acc = evaluate(net.to(dev), test, pixels, device=dev)
            net = net.cpu()
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)

    spec = ModelSpec(
        name=config.name,
        version=config.version,
        labels=labels,
        input_size=pixels.input_size,
        color_mode=pixels.color_mode,
        mean=pixels.mean,
        std=pixels.std,
        resize=pixels.resize,
        resample=pixels.resample,
        alpha=config.alpha,
        stem_stride=config.resolved_stem_stride(),
        recipe=config.recipe if config.epochs > 0 else "untrained",
        epochs=config.epochs,
        dataset=name,
        data_fingerprint=fingerprint,
    )
    model_path = export_onnx(net, spec, out / "model.onnx")
    report = verify(
        model_path, net, pixels, test, torch_accuracy=torch_acc, batch_size=config.eval_batch_size
    )
    from model.quantize import write_spec
    from service.spec import read_spec

    spec = read_spec(str(model_path)).model_copy(update={"test_accuracy": report.onnx_accuracy})
    write_spec(model_path, spec)
    log.info(
        "verify: max |ORT - PyTorch| = %.2e on %s; ORT test accuracy %s",
        report.max_abs_diff,
        report.compared_on,
        report.onnx_accuracy,
    )

    int8_path, int8_acc = None, None
    if config.int8 and report.ok:
        int8_path, int8_acc = _quantize(model_path, spec, pixels, train, test, config)

    results = {
        "verified": report.ok,
        "problems": report.problems,
        "max_abs_diff": report.max_abs_diff,
        "compared_on": report.compared_on,
        "tolerance": report.tolerance,
        "torch_accuracy": torch_acc,
        "onnx_accuracy": report.onnx_accuracy,
        "int8_path": str(int8_path) if int8_path else None,
        "int8_accuracy": int8_acc,
        "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    card = {
        "spec": spec.model_dump(),
        "config": dataclasses.asdict(config),
        "results": results,
        "history": history,
        "parameters": params,
        "train_images": len(train) if train is not None else 0,
        "test_images": len(test) if test is not None else 0,
        "device": _describe_device(device, torch),
        "versions": card_mod.versions(),
    }
    json_path, md_path = card_mod.write_card(out, card)
    log.info("wrote %s, %s, %s in %.1f s", model_path, json_path, md_path, results["build_seconds"])
    if not report.ok:
        for problem in report.problems:
            log.error("verification failed: %s", problem)
        return 1
    return 0


def _describe_device(device: str, torch) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} thread(s))"


def _quantize(model_path, spec, pixels, train, test, config):
    """INT8 static quantization calibrated on training images; measured on the test set."""
    from model.evaluate import onnx_accuracy
    from model.quantize import quantize_int8, write_spec
    from model.verify import ort_session
    from service import preprocess

    rng = np.random.default_rng(config.seed)
    if train is not None:
        idx = np.sort(rng.permutation(len(train))[: config.calibration_size])
        calibration = preprocess.normalize(train.images[idx], pixels)
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
    int8_path = quantize_int8(model_path, calibration, model_path.with_suffix(".int8.onnx"))
    acc = None
    if test is not None:
        acc = onnx_accuracy(
            ort_session(int8_path),
            test,
            pixels,
            batch_size=config.eval_batch_size,
            desc="onnxruntime int8",
        )
        write_spec(int8_path, spec.model_copy(update={"precision": "int8", "test_accuracy": acc}))
    log.info("int8: %s, ORT test accuracy %s", int8_path, acc)
    return int8_path, acc


def run_build(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from model.data import DataError

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with logging_redirect_tqdm():
            return build(config, args.out)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model", description="Build, verify and cost MobileNetV1 models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser(
        "build", help="train, export and verify a model", description=__doc__.splitlines()[0]
    )
    _add_build_arguments(build_parser)
    build_parser.set_defaults(func=run_build)
    # Imported here, not at the top: the cost report pulls in onnxruntime, which `build --help`
    # and importing this module do not need.
    from model import cost_cli

    cost_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sepconv-build --recipe smoke` means `build`: the subcommand is optional on that script.
    if not argv or argv[0] not in ("build", "cost", "-h", "--help"):
        argv.insert(0, "build")
    # Our progress at INFO; libraries only when they warn.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("model").setLevel(logging.INFO)
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
