"""The model repository on disk, Triton's layout: ``DIR/<name>/<version>/model.onnx``.

``SEPCONV_MODEL_REPOSITORY=DIR`` serves every model folder under ``DIR``; each numeric
subfolder is a version of it. Which versions are served is the model's version policy, read
from an optional ``DIR/<name>/config.json`` in Triton's JSON spelling of
``ModelVersionPolicy``::

    {"version_policy": {"latest": {"num_versions": 2}}}     # the 2 highest (default: 1)
    {"version_policy": {"all": {}}}                         # every version
    {"version_policy": {"specific": {"versions": [1, 3]}}}  # exactly these

Only ``version_policy`` is read; other keys are refused, so a typo is not silently ignored.
Folders whose name is not a model name, hidden ones, and version folders that are not numbers
are skipped (the scan says so).

Pure functions of the file system, no server state: the repository
(:mod:`service.engine.repository`) decides what to load from what this module sees.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: A model name as URLs, metric labels and file names can all carry it.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"


class LayoutError(ValueError):
    """The repository, or one model folder in it, cannot be read as a repository."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Latest(_Strict):
    num_versions: int = Field(1, ge=1)


class All(_Strict):
    pass


class Specific(_Strict):
    versions: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class VersionPolicy(_Strict):
    """Exactly one of ``latest``, ``all`` and ``specific`` (Triton's ``ModelVersionPolicy``)."""

    latest: Latest | None = None
    all: All | None = None
    specific: Specific | None = None

    def model_post_init(self, _context) -> None:
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of latest, all and specific, not {' and '.join(given)}")

    @property
    def kind(self) -> Literal["latest", "all", "specific"]:
        if self.all is not None:
            return "all"
        if self.specific is not None:
            return "specific"
        return "latest"

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of ``available``, in ascending order."""
        ordered = sorted(set(available))
        if self.all is not None:
            return ordered
        if self.specific is not None:
            wanted = set(self.specific.versions)
            return [v for v in ordered if v in wanted]
        keep = (self.latest or Latest()).num_versions
        return ordered[-keep:]

    def describe(self) -> str:
        if self.all is not None:
            return "all versions"
        if self.specific is not None:
            return "versions " + ", ".join(map(str, sorted(self.specific.versions)))
        n = (self.latest or Latest()).num_versions
        return "the latest version" if n == 1 else f"the latest {n} versions"


class ModelConfig(_Strict):
    """``DIR/<name>/config.json``: what the repository reads of a model's configuration."""

    version_policy: VersionPolicy = VersionPolicy()


def read_config(model_dir: Path) -> ModelConfig:
    """The model's configuration, the defaults when it has no ``config.json``."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        document = json.loads(path.read_text())
        return ModelConfig.model_validate(document)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError(f"{path} is not readable JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise LayoutError(f"{path}: {problems}") from exc


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What tells a changed model file from the one loaded: size and modification time."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class VersionFile:
    version: str
    path: Path
    fingerprint: Fingerprint


@dataclass(slots=True)
class ModelFolder:
    """One model as the repository holds it: the versions its policy selects, and why others
    are not served."""

    name: str
    path: Path
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    #: The versions to serve (selected by the policy), ascending.
    versions: list[VersionFile] = field(default_factory=list)
    #: Why the folder cannot be served at all (bad config.json), or "".
    error: str = ""
    #: Version folders present but not served, and why (no model.onnx, not a number).
    skipped: dict[str, str] = field(default_factory=dict)


def version_key(version: str) -> tuple[int, int | str]:
    """Sort key: numeric versions by value, after any that are not numbers."""
    return (1, int(version)) if version.isdigit() else (0, version)


def scan_model(model_dir: Path) -> ModelFolder:
    """What ``model_dir`` offers: its policy and the version files the policy selects."""
    folder = ModelFolder(name=model_dir.name, path=model_dir)
    try:
        folder.policy = read_config(model_dir).version_policy
    except LayoutError as exc:
        folder.error = str(exc)
        return folder
    found: dict[int, Path] = {}
    try:
        entries = sorted(model_dir.iterdir())
    except OSError as exc:
        folder.error = f"cannot list {model_dir}: {exc}"
        return folder
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if not entry.name.isdigit():
            folder.skipped[entry.name] = "not a version: version folders are numbers"
            continue
        model_file = entry / MODEL_FILE
        if not model_file.is_file():
            folder.skipped[entry.name] = f"no {MODEL_FILE} in {entry}"
            continue
        found[int(entry.name)] = model_file
    for number in folder.policy.select(list(found)):
        path = found[number]
        try:
            fingerprint = Fingerprint.of(path)
        except OSError as exc:  # removed between the listing and now
            folder.skipped[str(number)] = f"cannot read {path}: {exc}"
            continue
        folder.versions.append(VersionFile(str(number), path, fingerprint))
    return folder


def scan_repository(root: Path) -> dict[str, ModelFolder]:
    """Every model folder under ``root``, by name; raises :class:`LayoutError` when ``root``
    itself is not a readable folder."""
    if not root.is_dir():
        raise LayoutError(
            f"the model repository {root} is not a folder; it must hold "
            f"<name>/<version>/{MODEL_FILE}"
        )
    models = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and NAME_PATTERN.match(entry.name):
            models[entry.name] = scan_model(entry)
    return models


class RepositorySource:
    """``SEPCONV_MODEL_REPOSITORY``: every model folder under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def scan(self) -> dict[str, ModelFolder]:
        return scan_repository(self.root)

    def where(self, name: str) -> str:
        return f"{self.root / name}"


class SingleModelSource:
    """``SEPCONV_MODEL_PATH``: one file served as a one-model repository.

    The model is named by ``name`` (``SEPCONV_MODEL_NAME``, else the file's metadata) and its
    version is the one its metadata gives, read again only when the file changes.
    """

    def __init__(self, path: Path, name: str, version: str) -> None:
        self.path = path
        self.name = name
        self._version = version
        self._fingerprint: Fingerprint | None = None

    def scan(self) -> dict[str, ModelFolder]:
        folder = ModelFolder(name=self.name, path=self.path.parent)
        try:
            fingerprint = Fingerprint.of(self.path)
        except OSError as exc:
            folder.error = f"cannot read {self.path}: {exc}"
            return {self.name: folder}
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            try:
                from sepconv.spec import read_spec

                self._version = read_spec(self.path).version
            except (OSError, ValueError):
                pass  # half-written or corrupt: the load says why, under the last version
        folder.versions.append(VersionFile(self._version, self.path, fingerprint))
        return {self.name: folder}

    def where(self, name: str) -> str:
        return str(self.path)
