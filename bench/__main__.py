"""``python -m bench [WORKLOAD] [flags]``: start the server on loopback, load it, write a report.

Workloads (``python -m bench WORKLOAD --help`` for each one's flags):

- ``sweep`` (the default): raw ORT, then closed-loop concurrency levels and open-loop rates;
- ``overload``: capacity, then open-loop load at multiples of it and a retry storm;
- ``photos``: generated camera-sized JPEGs, optionally A/B against another checkout;
- ``reload``: new model versions loaded under load (API and polling), then RSS over
  load/unload cycles;
- ``cpu``: the server's CPU per request over a fixed number of requests, optionally A/B against
  another checkout.

Every point is bounded in time and request count; reports go to ``docs/results/`` (``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bench import harness
from bench.harness import Workload

#: The subcommands, each ``bench/<name>.py`` with a ``WORKLOAD`` (:class:`harness.Workload`);
#: the first is what ``python -m bench`` runs without one. A new workload is its module plus one
#: more name here.
WORKLOADS = ("sweep", "overload", "photos", "reload", "cpu")

#: The flags of the single command this replaced, and what they became.
LEGACY_WORKLOAD_FLAGS = {"--overload": "overload", "--photos": "photos"}
LEGACY_RENAMED = {
    "--overload-factors": "--factors",
    "--overload-duration": "--factor-duration",
    "--overload-concurrency": "--concurrency",
    "--overload-connections": "--connections",
    "--overload-rounds": "--rounds",
    "--overload-storm": "--storm",
    "--overload-pause": "--pause",
    "--overload-idle": "--idle",
    "--photo-sizes": "--sizes",
}


def workloads() -> dict[str, Workload]:
    return {name: importlib.import_module(f"bench.{name}").WORKLOAD for name in WORKLOADS}


def legacy_hint(argv: list[str]) -> str | None:
    """For a command line of the old single command (``--overload``, ``--photos``, their
    prefixed flags), the same run as a subcommand; None for anything else."""
    flags = [arg.split("=", 1)[0] for arg in argv]
    if not any(f in LEGACY_WORKLOAD_FLAGS or f in LEGACY_RENAMED for f in flags):
        return None
    workload = next((LEGACY_WORKLOAD_FLAGS[f] for f in flags if f in LEGACY_WORKLOAD_FLAGS), None)
    workload = workload or ("photos" if "--photo-sizes" in flags else "overload")
    rest = []
    for arg in argv[1:] if argv[0] in WORKLOADS else argv:
        flag, sep, value = arg.partition("=")
        if flag in LEGACY_WORKLOAD_FLAGS:
            continue
        rest.append(LEGACY_RENAMED.get(flag, flag) + sep + value)
    return (
        f"--{workload} is the '{workload}' subcommand now, whose flags have no "
        f"'--{'photo' if workload == 'photos' else workload}-' prefix; that run is:\n"
        f"  python -m bench {workload} {' '.join(rest)}".rstrip()
    )


def build_parser(
    registry: dict[str, Workload],
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command and one subcommand parser per workload."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Start the server on loopback, load it with one workload, write a report.",
        epilog=f"Without a workload, {WORKLOADS[0]} runs: python -m bench --quick is "
        f"python -m bench {WORKLOADS[0]} --quick.",
    )
    sub = parser.add_subparsers(dest="workload", metavar="WORKLOAD", required=True)
    subparsers = {}
    for name, workload in registry.items():
        p = subparsers[name] = sub.add_parser(
            name,
            help=workload.help,
            description=workload.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        harness.add_common_arguments(p, workload)
        workload.add_arguments(p)
    return parser, subparsers


def parse_args(argv: list[str] | None = None) -> tuple[Workload, argparse.Namespace, list[str]]:
    """(workload, its arguments with presets applied, the command line with the workload named)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hint = legacy_hint(argv)
    if hint:
        raise SystemExit(f"python -m bench: {hint}")
    registry = workloads()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, WORKLOADS[0])
    parser, subparsers = build_parser(registry)
    args = parser.parse_args(argv)
    workload = registry[args.workload]
    harness.apply_presets(args, workload)
    if workload.check_args is not None:
        workload.check_args(subparsers[workload.name], args)
    return workload, args, argv


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    workload, args, argv = parse_args(argv)
    return harness.run(workload, args, argv)


if __name__ == "__main__":
    sys.exit(main())
