"""The cost report's schema: what ``GET /v1/cost`` and ``python -m model cost`` return.

Pydantic models, so the endpoint's OpenAPI schema and the JSON output are the same thing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Bounds for one profiling request: enough runs for a stable median, few enough to stay short.
DEFAULT_PROFILE_RUNS = 20
MAX_PROFILE_RUNS = 200
PROFILE_WARMUP_RUNS = 2

Optimization = Literal["all", "extended", "basic", "disabled"]


class CostError(ValueError):
    """The model cannot be costed; the message names the node or input at fault."""


class LayerKind(StrEnum):
    STANDARD = "standard"  # group 1, kernel larger than 1x1
    POINTWISE = "pointwise"  # group 1, 1x1 kernel
    DEPTHWISE = "depthwise"  # group == M input channels, N == k*M (channel multiplier k)
    GROUPED = "grouped"  # any other group > 1
    FULLY_CONNECTED = "fully_connected"  # Gemm, or MatMul by a constant matrix
    MATMUL = "matmul"  # MatMul of two activations (no parameters)


# --------------------------------------------------------------------------- report schema


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerCost(_Model):
    """One Conv/Gemm/MatMul node at batch 1. Spatial fields are null for fully connected layers."""

    name: str = Field(description="ONNX node name.")
    weight: str = Field(description="Weight tensor name (usually the framework's module path).")
    op_type: str
    kind: LayerKind
    label: str = Field(description="Row of the per-kind table, e.g. 'Conv DW 3x3'.")
    input_h: int | None
    input_w: int | None
    input_channels: int = Field(description="M: input channels (features for FC).")
    kernel_h: int | None
    kernel_w: int | None
    stride_h: int | None
    stride_w: int | None
    pads: list[int] | None = Field(description="top, left, bottom, right")
    dilation_h: int | None
    dilation_w: int | None
    group: int
    output_h: int | None
    output_w: int | None
    output_channels: int = Field(description="N: output channels (features for FC).")
    mult_adds: int
    weight_params: int
    bias_params: int
    params: int
    bytes_moved: int = Field(
        description="Input + weights + bias + output bytes: the least traffic the layer needs."
    )
    arithmetic_intensity: float = Field(description="mult_adds / bytes_moved.")


class SeparablePair(_Model):
    """A depthwise conv and the pointwise conv it feeds, against the standard conv they replace."""

    depthwise: str
    pointwise: str
    between: list[str] = Field(description="Op types on the path from depthwise to pointwise.")
    input_channels: int = Field(description="M")
    output_channels: int = Field(description="N")
    multiplier: int = Field(description="Depthwise channel multiplier (1 in MobileNet).")
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    output_h: int
    output_w: int
    standard_mult_adds: int = Field(description="Dk^2*M*N*Dp^2")
    separable_mult_adds: int = Field(description="Dk^2*M*Dp^2 + M*N*Dp^2, from the layer counts")
    standard_params: int
    separable_params: int
    ratio: float = Field(description="separable / standard mult-adds, from the counts")
    ratio_exact: str = Field(description="The same ratio as an exact fraction.")
    formula_ratio: float = Field(description="multiplier * (1/N + 1/Dk^2)")
    formula_exact: str
    agrees: bool = Field(description="ratio_exact == formula_exact, compared as fractions.")


class KindShare(_Model):
    """One row of the per-kind table (the MobileNet paper's Table 2)."""

    label: str
    kind: LayerKind
    layers: int
    mult_adds: int
    mult_adds_share: float = Field(description="Fraction of the network's mult-adds (0..1).")
    params: int
    params_share: float = Field(description="Fraction of the network's params (0..1).")
    bytes_moved: int
    arithmetic_intensity: float = Field(description="mult-adds per byte moved.")


class Totals(_Model):
    mult_adds: int
    params: int = Field(description="Weights + biases of all Conv/Gemm/MatMul layers.")
    other_params: int = Field(
        description="Float constants outside those layers (e.g. unfolded BatchNormalization)."
    )
    bn_folded: bool = Field(description="True iff no BatchNormalization node remains.")
    batchnorm_nodes: int
    full_conv_mult_adds: int = Field(
        description="The same network with every separable pair replaced by a standard conv."
    )
    full_conv_params: int
    mult_adds_reduction: float = Field(description="full_conv_mult_adds / mult_adds")
    params_reduction: float = Field(description="full_conv_params / params")


class CostedModel(_Model):
    """The model the report is about (named apart from ``/v1/models``' ModelInfo)."""

    path: str
    name: str | None = None
    version: str | None = None
    alpha: float | None = None
    precision: str | None = None
    input_name: str
    input_shape: list[int] = Field(description="The shape the counts are for (batch fixed to 1).")
    opset: int
    nodes: int


class KindTiming(_Model):
    label: str
    time_ms: float = Field(description="Median kernel time per inference, summed over layers.")
    time_share: float = Field(description="Fraction of all kernel time (0..1).")
    mult_adds_share: float
    gmacs_per_s: float = Field(description="Achieved giga mult-adds per second.")
    arithmetic_intensity: float = Field(description="mult-adds per byte moved (static).")


class LayerTiming(_Model):
    name: str
    label: str
    time_us: float
    gmacs_per_s: float


class ProfileReport(_Model):
    runs: int
    warmup: int
    intra_op_threads: int
    providers: list[str]
    optimization: Optimization
    onnxruntime_version: str
    wall_ms_median: float = Field(description="Median session.run() wall time at batch 1.")
    kernel_ms: float = Field(description="Sum of the median kernel times of every node.")
    other_ms: float = Field(description="Kernel time not attributable to a counted layer.")
    unmapped_nodes: list[str] = Field(description="Profiled nodes that map to no counted layer.")
    kinds: list[KindTiming]
    layers: list[LayerTiming]


class CostReport(_Model):
    model: CostedModel
    layers: list[LayerCost]
    separable_pairs: list[SeparablePair]
    totals: Totals
    shares: list[KindShare]
    profile: ProfileReport | None = None

    def activation_bytes_per_image(self, itemsize: int = 4) -> int:
        """The largest input plus output of one layer for one image, in bytes: what a run
        holds at its peak for each image of its batch (float32 activations by default)."""

        def elements(channels: int, h: int | None, w: int | None) -> int:
            return channels * (h or 1) * (w or 1)

        return itemsize * max(
            (
                elements(layer.input_channels, layer.input_h, layer.input_w)
                + elements(layer.output_channels, layer.output_h, layer.output_w)
                for layer in self.layers
            ),
            default=0,
        )
