"""Offline validation of rendered Kubernetes objects (used by tests/test_k8s.py).

- Core objects: the Kubernetes OpenAPI schemas that PyPI ``kubernetes-validate`` bundles, in
  their strict form (an unknown field is an error, as ``kubectl apply --validate=strict`` makes
  it), for pinned Kubernetes versions.
- KServe objects: walked through the typed models of PyPI ``kserve`` (``V1alpha1...``,
  ``V1beta1...``): every key must be a field of its model, every value of the field's declared
  type, required fields present (the models' own setters check that). Where a KServe model
  embeds a Kubernetes type (``V1Container``, ``V1ObjectMeta``...), that part is checked against
  the same strict Kubernetes schema as the core objects.

``kserve`` pins protobuf < 7, grpcio, pandas and more, which would downgrade the service's own
dependencies, so it is not installed into the virtualenv: scripts/setup.sh puts the wheel alone
(``--no-deps``) and ``six`` into ``<venv>/kserve-models``, and only ``kserve.models`` is loaded
from there. Its package ``__init__`` (the model server, gRPC, the Kubernetes client) is skipped:
the model classes need nothing but ``six`` and ``urllib3``.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

#: Where scripts/setup.sh installs the kserve wheel (and six) on its own.
KSERVE_MODELS_DIR = Path(sys.prefix) / "kserve-models"
SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


class SchemaError(AssertionError):
    """An object does not match its schema; the message names the field."""


def validate_core(obj: dict, version: str) -> None:
    """Strict OpenAPI validation of a core object (raises SchemaError)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise SchemaError(f"{_name(obj)}: {where}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise SchemaError(exc.message) from None


def _name(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --------------------------------------------------------------------------- definitions


def _schema_dir(version: str) -> Path:
    """The bundled strict schemas of the newest bundled release not newer than ``version``."""
    want = tuple(int(x) for x in version.lstrip("v").split(".")[:2])
    found = []
    for d in SCHEMAS.glob("v*-local-strict"):
        major, minor = (int(x) for x in d.name[1:].split("-")[0].split(".")[:2])
        if (major, minor) <= want:
            found.append(((major, minor), d))
    if not found:
        raise SchemaError(f"kubernetes-validate bundles no schemas for Kubernetes {version}")
    return max(found)[1]


@functools.cache
def _definitions_document(version: str) -> dict:
    return json.loads((_schema_dir(version) / "_definitions.json").read_text())


def _definitions(version: str) -> dict:
    return _definitions_document(version)["$defs"]


@functools.cache
def _validator(definition: str, version: str) -> jsonschema.Draft202012Validator:
    document = _definitions_document(version)
    registry = Resource.from_contents(document) @ Registry()
    return jsonschema.Draft202012Validator(
        {"$ref": f"{document['$id']}#/$defs/{definition}"}, registry=registry
    )


# Python client class name -> OpenAPI definition, for the names the KServe models use.
_GROUP_PREFIXES = (
    "io.k8s.api.core.v1.",
    "io.k8s.apimachinery.pkg.apis.meta.v1.",
    "io.k8s.api.apps.v1.",
    "io.k8s.api.autoscaling.v2.",
)
_API_GROUPS = {
    "AppsV1": "io.k8s.api.apps.v1.",
    "CoreV1": "io.k8s.api.core.v1.",
    "AutoscalingV2": "io.k8s.api.autoscaling.v2.",
}


def _definition_for(type_name: str, version: str) -> str:
    definitions = _definitions(version)
    if type_name == "ResourceQuantity":
        return "io.k8s.apimachinery.pkg.api.resource.Quantity"
    if type_name.startswith("K8sIoApi"):  # K8sIoApiAppsV1DeploymentStrategy
        rest = type_name[len("K8sIoApi") :]
        for group, prefix in _API_GROUPS.items():
            if rest.startswith(group) and f"{prefix}{rest[len(group) :]}" in definitions:
                return f"{prefix}{rest[len(group) :]}"
    if type_name.startswith("V1"):
        for prefix in _GROUP_PREFIXES:
            if prefix + type_name[2:] in definitions:
                return prefix + type_name[2:]
    raise SchemaError(f"no Kubernetes {version} schema for the KServe field type {type_name}")


def validate_definition(data: Any, definition: str, version: str, where: str) -> None:
    errors = sorted(
        _validator(definition, version).iter_errors(data), key=lambda e: list(e.absolute_path)
    )
    if errors:
        err = errors[0]
        path = "/".join([where, *map(str, err.absolute_path)])
        raise SchemaError(f"{path}: {err.message}")


# --------------------------------------------------------------------------- KServe


@functools.cache
def kserve_models() -> types.ModuleType:
    """``kserve.models`` from the side install, without running ``kserve/__init__.py``."""
    package_dir = KSERVE_MODELS_DIR / "kserve"
    if not (package_dir / "models" / "__init__.py").is_file():
        raise FileNotFoundError(
            f"kserve models not installed in {KSERVE_MODELS_DIR} (scripts/setup.sh installs "
            "them: pip install --no-deps --target <venv>/kserve-models kserve six)"
        )
    if str(KSERVE_MODELS_DIR) not in sys.path:
        sys.path.append(str(KSERVE_MODELS_DIR))  # after the venv: only six and kserve are new
    if "kserve" not in sys.modules:
        stub = types.ModuleType("kserve")
        stub.__path__ = [str(package_dir)]
        sys.modules["kserve"] = stub
    return importlib.import_module("kserve.models")


KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}

_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def validate_kserve(obj: dict, version: str) -> Any:
    """Build the typed KServe model of ``obj``, checking every field on the way."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KSERVE_KINDS:
        raise SchemaError(f"{_name(obj)}: not a KServe kind this check knows: {key}")
    return _typed(obj, KSERVE_KINDS[key], version, _name(obj))


def _typed(data: Any, type_name: str, version: str, where: str) -> Any:
    if type_name in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[type_name]) or (
            type_name != "bool" and isinstance(data, bool)
        ):
            raise SchemaError(f"{where}: expected {type_name}, got {data!r}")
        return data
    if type_name == "object":
        return data
    if type_name.startswith("list[") and type_name.endswith("]"):
        if not isinstance(data, list):
            raise SchemaError(f"{where}: expected a list, got {data!r}")
        return [_typed(v, type_name[5:-1], version, f"{where}/{i}") for i, v in enumerate(data)]
    if type_name.startswith("dict(") and type_name.endswith(")"):
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected a map, got {data!r}")
        value_type = type_name[5:-1].split(",", 1)[1].strip()
        return {k: _typed(v, value_type, version, f"{where}/{k}") for k, v in data.items()}
    models = kserve_models()
    cls = getattr(models, type_name, None)
    if cls is None:
        # A Kubernetes type inside a KServe object: the strict Kubernetes schema.
        validate_definition(data, _definition_for(type_name, version), version, where)
        return data
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a {type_name} object, got {data!r}")
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise SchemaError(f"{where}: {type_name} has no field(s) {unknown}")
    kwargs = {
        by_json[k]: _typed(v, cls.openapi_types[by_json[k]], version, f"{where}/{k}")
        for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the models' required-field checks
        raise SchemaError(f"{where}: {exc}") from None
