"""What is being served: identity, labels, input contract, providers, card figures."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import ModelQuery, RepositoryDep, VersionQuery
from service.api.errors import error_example
from service.engine.runtime import ModelRuntime
from service.errors import NOT_READY_DETAIL

router = APIRouter(tags=["model"])


class InputSpec(BaseModel):
    name: str = Field(description="ONNX input name.", examples=["input"])
    shape: list[int | str] = Field(
        description="NCHW; the batch axis is dynamic.", examples=[["batch", 1, 28, 28]]
    )
    dtype: str = Field(examples=["float32"])
    color_mode: str = Field(description="L (grey) or RGB.", examples=["L"])
    size: int = Field(description="Square input side in pixels.", examples=[28])
    resize: str = Field(examples=["center-crop"])
    resample: str = Field(examples=["bilinear"])
    mean: list[float] = Field(examples=[[0.286]])
    std: list[float] = Field(examples=[[0.353]])


class Optimization(BaseModel):
    """How the served network was made cheaper, as its build recorded it."""

    conv: str = Field(
        description="separable (depthwise + pointwise) or standard (full 3x3 convs).",
        examples=["separable"],
    )
    precision: str = Field(examples=["fp32"])
    prune_ratio: float = Field(
        description="Share of every layer's output channels removed (0: not pruned).",
        examples=[0.5],
    )
    widths: list[int] | None = Field(
        description="Output channels of the stem and of each block after pruning.",
        examples=[[8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]],
    )
    teacher: str = Field(
        description="The network whose soft targets trained this one ('' if not distilled).",
        examples=["mobilenet_v1-sep-1.0 alpha 1, test accuracy 92.96% (sep-1.0/model.onnx)"],
    )


class ModelInfo(BaseModel):
    name: str = Field(examples=["mobilenet_v1-fashion-mnist"])
    version: str = Field(examples=["1"])
    labels: list[str] = Field(examples=[["T-shirt/top", "Trouser", "Pullover"]])
    num_classes: int = Field(examples=[10])
    input: InputSpec
    providers: list[str] = Field(
        description="Execution providers onnxruntime really uses, in priority order.",
        examples=[["CPUExecutionProvider"]],
    )
    alpha: float = Field(description="Width multiplier.", examples=[0.5])
    accuracy: float | None = Field(description="Test accuracy from the card.", examples=[0.91])
    precision: str = Field(examples=["fp32"])
    optimization: Optimization
    dataset: str = Field(examples=["fashion-mnist"])
    recipe: str = Field(examples=["quick"])
    epochs: int = Field(examples=[8])
    build_date: str = Field(examples=["2026-01-01T00:00:00Z"])
    path: str = Field(examples=["artifacts/model.onnx"])


def describe(runtime: ModelRuntime) -> ModelInfo:
    spec = runtime.spec
    return ModelInfo(
        name=spec.name,
        version=spec.version,
        labels=spec.labels,
        num_classes=spec.num_classes,
        input=InputSpec(
            name=spec.input_name,
            shape=["batch", spec.channels, spec.input_size, spec.input_size],
            dtype="float32",
            color_mode=spec.color_mode,
            size=spec.input_size,
            resize=spec.resize,
            resample=spec.resample,
            mean=spec.mean,
            std=spec.std,
        ),
        providers=runtime.providers,
        alpha=spec.alpha,
        accuracy=spec.test_accuracy,
        precision=spec.precision,
        optimization=Optimization(
            conv=spec.conv,
            precision=spec.precision,
            prune_ratio=spec.prune_ratio,
            widths=spec.widths,
            teacher=spec.teacher,
        ),
        dataset=spec.dataset,
        recipe=spec.recipe,
        epochs=spec.epochs,
        build_date=spec.build_date,
        path=str(runtime.path),
    )


@router.get(
    "/v1/models",
    summary="Describe a served model",
    description="The default model, or the one `model` (and `version`) name: "
    "name, version, labels, input contract (size, colour mode, normalisation), "
    "the execution providers that really run it, width multiplier, test accuracy and how the "
    "network was optimised (convolution type, pruning, teacher, precision), all read from the "
    "ONNX file's metadata.",
    response_model=ModelInfo,
    responses={
        **error_example(404, "not_found", "unknown model 'resnet'", "No such model."),
        **error_example(503, "not_ready", NOT_READY_DETAIL, "Model not loaded yet."),
    },
)
async def get_model(
    repository: RepositoryDep, model: ModelQuery = None, version: VersionQuery = None
) -> ModelInfo:
    with repository.lease(model, version) as classifier:
        return describe(classifier.runtime)
