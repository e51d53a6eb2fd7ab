"""Benchmark: a cheap load generator, raw ONNX Runtime as the yardstick, and the workloads.

Run ``python -m bench --help`` (workloads: ``sweep``, the default, ``overload``, ``photos``);
reports go to ``docs/NAME_results.md`` and ``docs/NAME_*.png``.
"""
