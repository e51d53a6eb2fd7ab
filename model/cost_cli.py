"""``python -m model cost MODEL.onnx``: the cost report of any exported file.

A thin front end over :mod:`sepconv.cost` (the same code behind ``GET /v1/cost``). The model CLI
registers it with :func:`add_parser`; ``python -m model.cost_cli`` also works on its own.
"""

from __future__ import annotations

import argparse
import sys

from sepconv.cost import (
    DEFAULT_PROFILE_RUNS,
    MAX_PROFILE_RUNS,
    CostError,
    analyze_model,
    profile_model,
    render,
)


def _runs(value: str) -> int:
    runs = int(value)
    if not 1 <= runs <= MAX_PROFILE_RUNS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_PROFILE_RUNS}")
    return runs


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="exported ONNX file")
    parser.add_argument(
        "--format", choices=("json", "markdown", "text"), default="text", help="output format"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="spatial size for a graph with symbolic height/width and no sepconv metadata",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time each layer kind with the ONNX Runtime profiler on this machine",
    )
    parser.add_argument(
        "--runs",
        type=_runs,
        default=DEFAULT_PROFILE_RUNS,
        help=f"profiled inferences, median taken (1..{MAX_PROFILE_RUNS})",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime intra-op threads when profiling"
    )
    parser.add_argument(
        "--optimization",
        choices=("all", "extended", "basic", "disabled"),
        default="all",
        help="ONNX Runtime graph optimization level when profiling (the service runs 'all')",
    )
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``cost`` subcommand on the model CLI's subparsers."""
    return _configure(
        subparsers.add_parser(
            "cost",
            help="exact mult-adds/params per layer, separable-pair savings, optional profile",
            description=__doc__.splitlines()[0],
        )
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = analyze_model(args.model, input_size=args.input_size)
        if args.profile:
            profile = profile_model(
                args.model,
                report,
                runs=args.runs,
                intra_op_threads=args.threads,
                optimization=args.optimization,
            )
            report = report.model_copy(update={"profile": profile})
    except FileNotFoundError:
        print(f"error: {args.model} does not exist", file=sys.stderr)
        return 2
    except CostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render(report, args.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="python -m model.cost_cli"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
