"""Benchmark: a cheap load generator, raw ONNX Runtime as the yardstick, and the workloads.

Run ``python -m bench --help`` (workloads: ``sweep``, the default, ``overload``, ``photos``,
``reload``); reports go to ``docs/results/NAME_results.md`` and ``docs/results/NAME_*.png``.
"""

from pathlib import Path

#: Where every benchmark writes its report by default (relative to the checkout's root).
RESULTS = Path("docs/results")
