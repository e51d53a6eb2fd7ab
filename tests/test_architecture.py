"""The layout's rules, checked: who may import whom (between packages and between the layers
inside ``service/``), no import cycle anywhere, module size, and an engine that runs without
Prometheus or a web framework."""

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
#: The layers of ``service/``, lowest first: a module imports from its own layer or below,
#: so data flows one way (bytes -> engine -> protocol response) and the folders show it.
SERVICE_LAYERS = (
    # What everything may use: the framework-free errors, the settings, logging, drain state.
    ("service.errors", "service.settings", "service.logs", "service.drain"),
    # The engine: repository, classifier, batcher, runtime; no web framework, no metrics.
    ("service.engine",),
    # Codecs and observers on top of the engine: wire formats, metrics, traces.
    ("service.protocols", "service.metrics", "service.metric_values", "service.tracing"),
    # The transports: FastAPI app and routes, the gRPC server; all call the repository seam.
    ("service.api",),
    # Running the app: uvicorn with the drain delay, the worker supervisor, the CLI.
    ("service.server",),
    ("service.supervisor", "service.preflight", "service.__main__", "service.client"),
)


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


# --- the module graph: layers and cycles ----------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth: function-level included)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in _modules(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from a import b`` imports the module a.b when there is one, else a.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _layer(module: str) -> int | None:
    for index, members in enumerate(SERVICE_LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    return None


def test_service_layers_import_only_downwards():
    graph = _graph()
    unplaced = [m for m in graph if m.startswith("service.") and _layer(m) is None]
    assert not unplaced, f"place these modules in SERVICE_LAYERS: {unplaced}"
    upward = {
        module: sorted(
            t for t in targets if t.startswith("service.") and _layer(t) > _layer(module)
        )
        for module, targets in graph.items()
        if module.startswith("service.")
    }
    upward = {m: t for m, t in upward.items() if t}
    assert not upward, f"imports from a higher layer of service/: {upward}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
