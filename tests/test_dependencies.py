"""pyproject.toml against the code: every third-party module a package imports comes from the
install it runs in, so `pip install .[cpu]` serves, the extras hold what only they need, and the
serving install stays small.

Which distribution provides a module is read from the installed distributions' file lists, so a
namespace package (``opentelemetry``: the API in the core, the SDK in an extra) is told apart by
its submodules.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"sepconv", "model", "service", "bench", "tests"}
#: Needed only by features that are off by default, or by the build: never in the core install.
NOT_CORE = {"tqdm", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"}
NOT_CORE |= {"opentelemetry-exporter-otlp-proto-grpc", "requests", "torch"}
#: Imports a caller catches the ImportError of, elsewhere than around the import itself.
OPTIONAL = {
    # The width sweep's plot: skipped without matplotlib (the bench extra), see write_report.
    "model/sweep_report.py": {"matplotlib", "matplotlib.pyplot"},
}


def requirements(*extras: str) -> list[str]:
    out = list(PROJECT["dependencies"])
    for extra in extras:
        out += PROJECT["optional-dependencies"][extra]
    return out


def closure(reqs: list[str]) -> set[str]:
    """Canonical names of the installed distributions ``reqs`` pull in, transitively."""
    found: dict[str, set[str]] = {}
    todo = [(Requirement(r), frozenset()) for r in reqs]
    while todo:
        req, extras = todo.pop()
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
            continue
        name = canonicalize_name(req.name)
        if name in found and set(req.extras) <= found[name]:
            continue
        found.setdefault(name, set()).update(req.extras)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # another variant's package (onnxruntime-gpu): not installed here
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or ()]
    return set(found)


@cache
def owners() -> dict[str, set[str]]:
    """Dotted module name -> the distributions whose files provide it."""
    out: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or ():
            parts = file.parts
            if not parts or parts[0] == ".." or ".dist-info" in parts[0]:
                continue
            if file.suffix not in (".py", ".so", ".pyd"):
                continue
            stem = parts[-1].split(".")[0]
            dotted = [*parts[:-1]] + ([] if stem == "__init__" else [stem])
            out.setdefault(".".join(dotted), set()).add(name)
    return out


def owner(module: str) -> set[str]:
    parts = module.split(".")
    while parts:
        found = owners().get(".".join(parts))
        if found:
            return found
        parts.pop()
    return set()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _catches_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError"}
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(k, ast.Name) and k.id in names for k in kinds):
            return True
    return False


def imports(path: Path, *, module_level: bool) -> set[str]:
    """Third-party modules ``path`` imports: at import time only, or anywhere. Imports under
    ``if TYPE_CHECKING`` and in a ``try`` that catches ImportError (optional ones) are left out."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # ``from pkg import sub`` imports the submodule where there is one.
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in owners() else node.module)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
            elif isinstance(node, ast.Try) and _catches_import_error(node):
                visit(node.orelse + node.finalbody)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                if not module_level:
                    visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []))

    visit(ast.parse(path.read_text(), str(path)).body)
    return {
        m
        for m in found
        if m.split(".")[0] not in sys.stdlib_module_names | FIRST_PARTY | {"__future__"}
    }


#: Installed apart from the server: the command-line client (the ``client`` extra).
CLIENT = "service/client"


def unprovided(packages: tuple[str, ...], installed: set[str], *, module_level: bool) -> dict:
    missing: dict[str, list[str]] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if package != CLIENT and name.startswith(CLIENT + "/"):
                continue
            found = imports(path, module_level=module_level) - OPTIONAL.get(name, set())
            bad = sorted(m for m in found if not owner(m) & installed)
            if bad:
                missing[name] = bad
    return missing


def test_the_checker_tells_namespace_packages_apart(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from opentelemetry import trace\n"
        "if TYPE_CHECKING:\n    import torch\n"
        "try:\n    import uvloop\nexcept ImportError:\n    uvloop = None\n"
        "def f():\n    from opentelemetry.sdk.trace import TracerProvider\n"
    )
    assert imports(module, module_level=True) == {"opentelemetry.trace"}
    assert imports(module, module_level=False) == {"opentelemetry.trace", "opentelemetry.sdk.trace"}
    assert owner("opentelemetry.trace") == {"opentelemetry-api"}
    assert owner("opentelemetry.sdk.trace") == {"opentelemetry-sdk"}


def test_core_install_holds_no_build_or_tracing_export_packages():
    assert not closure(requirements("cpu")) & NOT_CORE


def test_the_server_imports_only_the_core_install():
    """What ``python -m service`` imports before any setting turns a feature on."""
    missing = unprovided(("sepconv", "service"), closure(requirements("cpu")), module_level=True)
    assert not missing, f"not in the core dependencies (pyproject.toml): {missing}"


@pytest.mark.parametrize(
    ("packages", "extras"),
    [
        (("sepconv", "service"), ("cpu", "tracing")),
        (("model",), ("cpu", "build")),
        # The client needs neither ONNX Runtime nor the server's extras.
        ((CLIENT,), ("client",)),
    ],
)
def test_every_import_comes_from_the_install_that_runs_it(packages, extras):
    missing = unprovided(packages, closure(requirements(*extras)), module_level=False)
    assert not missing, f"not in the dependencies of {extras}: {missing}"
