"""The contract between the build step and the server: what an exported model says about itself.

The build step writes a :class:`ModelSpec` into the ONNX file's ``metadata_props``; the server
reads it back and never guesses labels or preprocessing. Every value is stored as a string
(ONNX metadata is ``map<string, string>``); lists are stored as JSON. This module is the only
reader and writer of that metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field, ValidationError

from sepconv.preprocess import Preprocessing

if TYPE_CHECKING:
    import onnx

#: Prefix of every key this project writes, so our keys never collide with an exporter's own.
KEY_PREFIX = "sepconv."
SCHEMA_VERSION = "1"
#: Fields added since schema 1 whose default differs from what older builds did: the value a
#: model file without the key was built with, so it is served exactly as it was trained.
LEGACY_VALUES: dict[str, str] = {"jpeg_gray": "rgb"}

Precision = Literal["fp32", "int8"]
#: ``separable``: MobileNetV1's depthwise + pointwise pairs; ``standard``: one full 3x3 conv in
#: place of each pair (the paper's Table 4 baseline).
ConvType = Literal["separable", "standard"]


class SpecError(ValueError):
    """The model file lacks, or carries a malformed, piece of the metadata contract."""


class ModelSpec(Preprocessing):
    """Everything the server needs to serve a model, and what a user wants to know about it.

    The preprocessing fields are inherited from :class:`~sepconv.preprocess.Preprocessing`, so
    a spec can be passed wherever preprocessing parameters are expected.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "mobilenet_v1"
    version: str = "0"
    labels: list[str] = Field(min_length=1)
    alpha: float = Field(gt=0, le=1)
    stem_stride: int = Field(2, ge=1, le=2)
    precision: Precision = "fp32"
    conv: ConvType = "separable"
    #: Share of every layer's output channels removed by structured pruning (0: not pruned).
    prune_ratio: float = Field(0.0, ge=0, lt=1)
    #: Output channels of the stem and of each block after pruning; None when not pruned.
    widths: list[int] | None = None
    #: The network whose soft targets trained this one ("" when not distilled).
    teacher: str = ""
    recipe: str = "untrained"
    epochs: int = 0
    dataset: str = ""
    data_fingerprint: str = ""
    test_accuracy: float | None = None
    torch_version: str = ""
    onnx_opset: int = 0
    build_date: str = ""
    input_name: str = "input"
    output_name: str = "logits"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def contract(self) -> dict[str, object]:
        """What a client relies on: the input it sends (tensor name and shape, or an image
        preprocessed this way) and what each output index means. A new version of a model
        must keep it, or clients would get wrong answers without an error."""
        return {
            "input_name": self.input_name,
            "channels": self.channels,
            "input_size": self.input_size,
            "color_mode": self.color_mode,
            "resize": self.resize,
            "resample": self.resample,
            "mean": list(self.mean),
            "std": list(self.std),
            "labels": list(self.labels),
        }

    def contract_changes(self, other: ModelSpec) -> list[str]:
        """How ``other``'s contract differs from this one's, one phrase per field."""
        mine, theirs = self.contract(), other.contract()
        return [
            f"{key} {mine[key]!r} -> {theirs[key]!r}" for key in mine if mine[key] != theirs[key]
        ]

    def to_metadata(self) -> dict[str, str]:
        """Flatten to ONNX ``metadata_props`` (string to string)."""
        out = {f"{KEY_PREFIX}schema": SCHEMA_VERSION}
        for key, value in self.model_dump().items():
            if value is None:
                continue
            out[KEY_PREFIX + key] = (
                json.dumps(value) if isinstance(value, list | dict) else str(value)
            )
        return out

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> ModelSpec:
        """Rebuild from ONNX ``metadata_props``; raises :class:`SpecError` naming the problem."""
        ours = {k[len(KEY_PREFIX) :]: v for k, v in props.items() if k.startswith(KEY_PREFIX)}
        if not ours:
            raise SpecError(
                "the ONNX file has no sepconv metadata; export it with `python -m model build`"
            )
        schema = ours.pop("schema", None)
        if schema != SCHEMA_VERSION:
            raise SpecError(f"unsupported metadata schema {schema!r}; expected {SCHEMA_VERSION!r}")
        values: dict[str, object] = dict(LEGACY_VALUES)
        for key, raw in ours.items():
            if key not in cls.model_fields:
                continue  # written by a newer build; ignoring keeps old servers working
            if raw.startswith("["):
                try:
                    values[key] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise SpecError(f"metadata key {KEY_PREFIX}{key} is not valid JSON") from exc
            else:
                values[key] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{KEY_PREFIX}{'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}"
                for e in exc.errors()
            )
            raise SpecError(f"invalid model metadata: {problems}") from exc


def spec_from_proto(proto: onnx.ModelProto) -> ModelSpec:
    """The spec carried by a loaded ONNX model (:class:`SpecError` when absent or malformed)."""
    return ModelSpec.from_metadata({p.key: p.value for p in proto.metadata_props})


def spec_from_bytes(data: bytes, name: str = "model") -> ModelSpec:
    """The spec of a serialized ONNX model; ``name`` only labels error messages."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise SpecError(f"{name} is not a readable ONNX model: {exc}") from exc
    return spec_from_proto(proto)


def read_spec(model_path: str | Path) -> ModelSpec:
    """Read the spec from an ONNX file (FileNotFoundError when it is missing)."""
    with open(model_path, "rb") as fh:
        return spec_from_bytes(fh.read(), str(model_path))


def embed_spec(proto: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """Replace the metadata of ``proto`` (in place, and returned) with exactly ``spec``."""
    del proto.metadata_props[:]
    for key, value in spec.to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def save_model(proto: onnx.ModelProto, spec: ModelSpec, path: str | Path) -> Path:
    """Write ``proto`` to ``path`` with ``spec`` as its metadata, after ONNX's checker passes.

    The build writes every model file through here, once, when all its figures are known.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    embed_spec(proto, spec)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def write_spec(path: str | Path, spec: ModelSpec) -> None:
    """Replace the metadata of an ONNX file on disk with ``spec``."""
    import onnx

    proto = onnx.load(str(path))
    onnx.save(embed_spec(proto, spec), str(path))
