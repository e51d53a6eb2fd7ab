"""The contract between the build step and the server: what an exported model says about itself.

The build step writes a :class:`ModelSpec` into the ONNX file's ``metadata_props``; the server
reads it back and never guesses labels or preprocessing. Every value is stored as a string
(ONNX metadata is ``map<string, string>``); lists are stored as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Prefix of every key this project writes, so our keys never collide with an exporter's own.
KEY_PREFIX = "sepconv."
SCHEMA_VERSION = "1"

ColorMode = Literal["L", "RGB"]
#: ``center-crop``: scale the shorter side to ``input_size`` then crop the centre square.
#: ``stretch``: scale both sides to ``input_size`` (aspect ratio not kept).
ResizePolicy = Literal["center-crop", "stretch"]
Resample = Literal["nearest", "bilinear", "bicubic", "lanczos"]
Precision = Literal["fp32", "int8"]


class SpecError(ValueError):
    """The model file lacks, or carries a malformed, piece of the metadata contract."""


class ModelSpec(BaseModel):
    """Everything the server needs to serve a model, and what a user wants to know about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "mobilenet_v1"
    version: str = "0"
    labels: list[str] = Field(min_length=1)
    input_size: int = Field(
        gt=0, description="Square input side in pixels (resolution multiplier)."
    )
    color_mode: ColorMode
    mean: list[float]
    std: list[float]
    resize: ResizePolicy = "center-crop"
    resample: Resample = "bilinear"
    alpha: float = Field(gt=0, le=1)
    stem_stride: int = Field(2, ge=1, le=2)
    precision: Precision = "fp32"
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

    @model_validator(mode="after")
    def _check_channels(self) -> ModelSpec:
        channels = self.channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean/std need {channels} value(s) for colour mode {self.color_mode}, "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @property
    def num_classes(self) -> int:
        return len(self.labels)

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
        values: dict[str, object] = {}
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


def spec_from_bytes(data: bytes, name: str = "model") -> ModelSpec:
    """The spec of a serialized ONNX model; ``name`` only labels error messages."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise SpecError(f"{name} is not a readable ONNX model: {exc}") from exc
    return ModelSpec.from_metadata({p.key: p.value for p in proto.metadata_props})


def read_spec(model_path: str) -> ModelSpec:
    """Read the spec from an ONNX file (FileNotFoundError when it is missing)."""
    with open(model_path, "rb") as fh:
        return spec_from_bytes(fh.read(), model_path)
