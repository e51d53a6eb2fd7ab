"""The layout's rules, checked: who may import whom, module size, and an engine that runs
without Prometheus or a web framework."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.engine.batcher import Batcher
from service.engine.context import RequestContext
from service.engine.observer import EngineObserver

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sepconv", "model", "service")
#: package -> top-level modules it must never import (directly or inside a function).
FORBIDDEN = {
    "sepconv": {"model", "service", "torch", "fastapi", "starlette", "prometheus_client"},
    "model": {"service"},
    "service": {"model", "torch"},
}
MAX_LINES = 600


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    offending = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in _modules(package)
        if _imports(path) & FORBIDDEN[package]
    }
    assert not offending, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offending}"


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from service.engine import batcher\n    import torch.nn\n")
    assert {"service", "torch"} <= _imports(module)


def test_no_module_is_over_the_size_limit():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in _modules(package)
    }
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_serving_imports_neither_torch_nor_the_build():
    code = (
        "import sys, service.api.app, service.__main__, service.supervisor\n"
        "bad = sorted(m for m in ('torch', 'model') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_engine_imports_no_metrics_or_web_framework():
    code = (
        "import sys, service.engine.batcher, service.engine.classifier, service.engine.runtime\n"
        "names = ('prometheus_client', 'fastapi', 'starlette')\n"
        "bad = sorted(m for m in names if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def queue_depth(self, depth):
        self.calls.append(("depth", depth))

    def rejected(self, reason):
        self.calls.append(("rejected", reason))

    def batch_started(self, size, queue_waits, contexts):
        self.calls.append(("batch", size, len(queue_waits), tuple(contexts)))

    def classified(self, images):
        self.calls.append(("classified", images))


def test_batcher_reports_through_its_observer():
    observer = Recorder()
    ctx = RequestContext(request_id="r1", protocol="test")

    async def body():
        batcher = Batcher(lambda x: x.sum(axis=(1, 2, 3))[:, None], observer=observer)
        batcher.start()
        try:
            out = await batcher.submit(np.ones((1, 2, 2), np.float32), ctx)
            with pytest.raises(Exception, match="deadline passed"):
                expired = RequestContext(deadline=0.0)
                await batcher.submit(np.ones((1, 2, 2), np.float32), expired)
            return out
        finally:
            await batcher.stop()

    assert asyncio.run(body()).tolist() == [4.0]
    assert ("batch", 1, 1, (ctx,)) in observer.calls
    assert ("classified", 1) in observer.calls
    assert ("rejected", "deadline") in observer.calls
