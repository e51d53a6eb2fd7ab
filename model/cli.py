"""``python -m model build ...`` (also ``sepconv-build``), ``python -m model cost ...`` and
``python -m model sweep ...``.

The build runs the stages of :mod:`model.build` (data -> network -> train -> evaluate -> export ->
verify [-> int8] -> card) and writes ``OUT/model.onnx``, ``OUT/model_card.json``,
``OUT/model_card.md``, ``OUT/build_config.json`` and the best checkpoint ``OUT/checkpoint.pt``.
It exits 1 when verification fails and 2 when the data or the settings are unusable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from model.recipes import RECIPES, BuildConfig, resolve

log = logging.getLogger("model.build")

#: With ``--epochs 0`` and no ``--data``, nothing is read and the network is the paper's
#: ImageNet one unless flags say otherwise.
PAPER_DEFAULTS = {"alpha": 1.0, "input_size": 224, "classes": 1000, "color": "RGB"}


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
        help="train a few batches, test on a few hundred images (CI smoke)",
    )
    o = p.add_argument_group("optimisation (docs/results/optimization.md measures each)")
    o.add_argument(
        "--conv",
        choices=("separable", "standard"),
        help="standard: one full 3x3 conv in place of each separable pair (paper's Table 4)",
    )
    o.add_argument(
        "--init",
        dest="init_checkpoint",
        metavar="CHECKPOINT",
        help="start from this checkpoint.pt (its architecture and weights); with --epochs 0 "
        "nothing is trained before pruning",
    )
    o.add_argument(
        "--prune",
        type=float,
        metavar="RATIO",
        help="remove this share of every layer's channels after training, then fine-tune",
    )
    o.add_argument("--prune-epochs", type=int, help="fine-tuning epochs after pruning (2)")
    o.add_argument("--prune-lr", type=float, help="fine-tuning peak lr (default: lr / 10)")
    o.add_argument(
        "--teacher",
        metavar="PATH",
        help="distil from this checkpoint.pt or ONNX model (same input and classes)",
    )
    o.add_argument(
        "--distill-temperature", type=float, help="softmax temperature of the soft targets (4)"
    )
    o.add_argument(
        "--distill-weight",
        type=float,
        help="weight of the soft targets against the labels, in [0, 1] (0.9)",
    )


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in BuildConfig.model_fields and k != "recipe"}


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    overrides = _overrides(args)
    config = resolve(args.recipe, args.config, overrides)
    if config.epochs == 0 and args.data is None and config.init_checkpoint is None:
        paper = {k: v for k, v in PAPER_DEFAULTS.items() if overrides.get(k) is None}
        config = resolve(args.recipe, args.config, overrides | paper | {"data": "none"})
    return config


def run_build(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Here, not at the top: the build pulls in torch, which `cost` and `--help` do not need.
    from model.build import build
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
    from model import cost_cli, sweep

    cost_cli.add_parser(sub)
    sweep.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sepconv-build --recipe smoke` means `build`: the subcommand is optional on that script.
    if not argv or argv[0] not in ("build", "cost", "sweep", "-h", "--help"):
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
