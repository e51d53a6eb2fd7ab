"""Benchmark: a cheap load generator, raw ONNX Runtime as the yardstick, and the sweep CLI.

Run ``python -m bench --help``; results go to ``docs/bench_results.md`` and ``docs/bench_*.png``.
"""
