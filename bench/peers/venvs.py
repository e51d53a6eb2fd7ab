"""Separate virtual environments for peers whose dependencies clash with this project's.

KServe pins much of the web stack (fastapi, uvicorn, pydantic, protobuf, grpcio...), so it never
goes into the project's environment: it gets its own venv under
``~/.cache/sepconv-serve/peers/`` (``$XDG_CACHE_HOME`` respected), created the first time a
measurement asks for it, never at import time. The packages that decide speed (onnxruntime,
Pillow, numpy) are pinned to the versions running here, so the peer computes with exactly the
same libraries; the peer's own package takes whatever pip resolves, and the version is reported.

Creating a venv needs the package index (PyPI or the configured mirror); where pip cannot reach
it, :class:`PeerSetupError` says so and how to skip the peer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger(__name__)

#: Installed into every peer venv at the versions this interpreter has.
PINNED_HERE = ("onnxruntime", "pillow", "numpy")
#: A peer venv must not pull these (torch alone is gigabytes and another copy of it is banned).
FORBIDDEN = ("torch",)
STAMP = "sepconv-peer.json"


class PeerSetupError(RuntimeError):
    """A peer's environment cannot be created or used; the message says what to do."""


@dataclass(frozen=True)
class PeerEnv:
    name: str
    packages: tuple[str, ...]  # the peer's own requirement specifiers

    def requirements(self) -> list[str]:
        return [*self.packages, *(f"{p}=={version(p)}" for p in PINNED_HERE)]


KSERVE = PeerEnv("kserve", ("kserve",))


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sepconv-serve" / "peers"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(venv: Path, package: str) -> str | None:
    """The version of ``package`` in the venv, from its stamp; None when not recorded."""
    try:
        return json.loads((venv / STAMP).read_text())["versions"].get(package)
    except (OSError, ValueError, KeyError):
        return None


def ensure_venv(env: PeerEnv, root: Path | None = None, *, install: bool = True) -> Path:
    """The venv's python for ``env``, creating or refreshing the venv when needed.

    A venv is reused when its stamp records the same requirements; otherwise it is rebuilt
    (onnxruntime upgraded here means the peer must follow). With ``install=False`` a missing
    or stale venv is an error instead.
    """
    venv = (root or cache_root()) / f"{env.name}-venv"
    wanted = env.requirements()
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp and stamp.get("requirements") == wanted and venv_python(venv).is_file():
        return venv_python(venv)
    if not install:
        raise PeerSetupError(
            f"no up-to-date {env.name} environment at {venv}; run without --no-install to "
            f"create it (pip install {' '.join(wanted)}), or leave {env.name} out of --servers"
        )
    log.info("creating %s (pip install %s); this takes a minute", venv, " ".join(wanted))
    venv.parent.mkdir(parents=True, exist_ok=True)
    (venv / STAMP).unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], env, "create the venv")
    python = str(venv_python(venv))
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install"]
    # Resolve first: a peer that would drag in torch is refused before anything is downloaded.
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _run([*pip, "--dry-run", "--quiet", "--report", str(report), *wanted], env, "resolve")
        resolved = {
            item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
    bad = sorted(set(resolved) & set(FORBIDDEN))
    if bad:
        raise PeerSetupError(
            f"{env.name} would install {', '.join(bad)}; refusing (it must not pull torch)"
        )
    _run([*pip, "--quiet", *wanted], env, "install")
    versions = {name: resolved.get(name) for name in resolved}
    (venv / STAMP).write_text(json.dumps({"requirements": wanted, "versions": versions}, indent=1))
    log.info("%s ready: %s %s", venv, env.name, versions.get(env.name, "?"))
    return venv_python(venv)


def _run(cmd: list[str], env: PeerEnv, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return
    output = (proc.stdout + proc.stderr).strip().splitlines()
    tail = "\n".join(line for line in output if "is ignored" not in line)[-2000:]
    hint = ""
    if any(s in tail for s in ("No matching distribution", "Could not find a version", "connect")):
        hint = (
            "\npip could not get the packages from the package index: check the network or "
            "PIP_INDEX_URL, or leave " + env.name + " out of --servers."
        )
    command = " ".join(cmd[:4])
    raise PeerSetupError(f"{env.name} venv: could not {what} ({command} ...):\n{tail}{hint}")


def current_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
