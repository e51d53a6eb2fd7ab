"""Knowledge distillation: train the student on a teacher's soft targets (Hinton et al. 2015).

The loss is ``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` plus
``(1 - weight) *`` the usual label-smoothed cross-entropy on the true labels; the ``T^2`` keeps the
soft term's gradients on the same scale whatever the temperature.

The teacher is a checkpoint (``checkpoint.pt``, rebuilt and run in PyTorch) or an ONNX model (run
through ONNX Runtime on the CPU). It must expect exactly the student's input: same size, colour
mode, mean/std and classes, checked before training starts.

Where its logits come from is decided once, explicitly, by :func:`teacher_logits_mode`:

* ``per-batch`` (whenever training augments): the teacher runs on the very augmented batch the
  student sees, so both networks get the same augmentation;
* ``cached`` (only when the augmentation is the identity): the teacher's logits for every training
  image are computed once before training and looked up by index, which is exact because every
  epoch then shows each image unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.data import Split, iter_batches, progress
from model.evaluate import to_input
from sepconv.preprocess import Preprocessing

log = logging.getLogger(__name__)

LogitsMode = Literal["per-batch", "cached"]
#: Mean/std of a teacher may differ from the student's by rounding only.
_PIXEL_TOLERANCE = 1e-6


class TeacherError(ValueError):
    """The teacher cannot be used for this student; the message says why."""


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    weight: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Soft-target KL divergence at ``temperature`` mixed with the hard-label cross-entropy."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0 <= weight <= 1:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher.detach() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    hard = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    return weight * soft + (1 - weight) * hard


class Teacher(Protocol):
    path: str
    kind: str
    #: One line for the model card and the ONNX metadata: which network taught the student.
    description: str

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, K) on ``x``'s device for a normalised batch ``x``."""
        ...


class TorchTeacher:
    kind = "checkpoint"

    def __init__(self, path: str, net: nn.Module, device: torch.device, description: str = ""):
        self.path = path
        self.net = net.to(device).eval()
        self.device = device
        self.description = description or path

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.net(x.to(self.device)).float()


class OnnxTeacher:
    kind = "onnx"

    def __init__(self, path: str, description: str = ""):
        import onnxruntime as ort

        self.path = path
        self.description = description or path
        opts = ort.SessionOptions()
        # Between teacher runs PyTorch trains the student on the same cores: ORT's threads
        # must sleep, not spin, once a batch is done.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self.session.get_inputs()[0].name

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # ORT wants plain NCHW float32 on the CPU; training may hand over channels-last on a GPU.
        batch = x.detach().float().cpu().contiguous().numpy()
        (out,) = self.session.run(None, {self._input: batch})
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def _check_pixels(path: str, size: int, color: str, mean, std, pixels: Preprocessing) -> None:
    problems = []
    if size != pixels.input_size:
        problems.append(f"input size {size} px, the student's is {pixels.input_size}")
    if color != pixels.color_mode:
        problems.append(f"colour mode {color}, the student's is {pixels.color_mode}")
    for what, theirs, ours in (("mean", mean, pixels.mean), ("std", std, pixels.std)):
        if len(theirs) != len(ours) or any(
            abs(a - b) > _PIXEL_TOLERANCE for a, b in zip(theirs, ours, strict=False)
        ):
            problems.append(f"{what} {list(theirs)}, the student's is {list(ours)}")
    if problems:
        raise TeacherError(f"teacher {path} expects other inputs: {'; '.join(problems)}")


def load_teacher(
    path: str | Path, pixels: Preprocessing, labels: list[str], device: torch.device
) -> Teacher:
    """Open a teacher and check that it sees the student's pixels and predicts its classes."""
    path = str(path)
    if not Path(path).is_file():
        raise TeacherError(f"teacher {path}: no such file")
    if path.endswith(".onnx"):
        from sepconv.spec import SpecError, read_spec

        try:
            spec = read_spec(path)
        except SpecError as exc:
            raise TeacherError(f"teacher {path}: {exc}") from exc
        _check_pixels(path, spec.input_size, spec.color_mode, spec.mean, spec.std, pixels)
        if spec.labels != list(labels):
            raise TeacherError(
                f"teacher {path} predicts classes {spec.labels[:10]}, the student "
                f"{list(labels)[:10]}: the class order must be the same"
            )
        return OnnxTeacher(path, _describe(path, spec.name, spec.alpha, spec.test_accuracy))
    from model.train import load_checkpoint

    try:
        net, ckpt = load_checkpoint(path)
    except Exception as exc:  # a corrupt or foreign file: torch raises many kinds
        raise TeacherError(
            f"teacher {path} is neither an ONNX model nor a readable checkpoint: {exc}"
        ) from exc
    classes = ckpt["model_args"]["num_classes"]
    if classes != len(labels):
        raise TeacherError(f"teacher {path} has {classes} classes, the student {len(labels)}")
    saved = ckpt.get("pixels")
    if saved is None:
        raise TeacherError(
            f"teacher {path} does not record the preprocessing it was trained with "
            "(a checkpoint from an older build); pass its model.onnx instead"
        )
    _check_pixels(
        path, saved["input_size"], saved["color_mode"], saved["mean"], saved["std"], pixels
    )
    args = ckpt["model_args"]
    name = f"MobileNetV1 ({args.get('conv', 'separable')})"
    return TorchTeacher(
        path, net, device, _describe(path, name, args["alpha"], ckpt.get("test_accuracy"))
    )


def _describe(path: str, name: str, alpha: float, accuracy: float | None) -> str:
    acc = f", test accuracy {100 * accuracy:.2f}%" if accuracy is not None else ""
    return f"{name} alpha {alpha:g}{acc} ({Path(path).parent.name}/{Path(path).name})"


def augmentation_is_identity(config) -> bool:
    """True when training shows every image unchanged (no crop, flip or erasing)."""
    return config.crop_padding == 0 and not config.hflip and config.erase_prob == 0


def teacher_logits_mode(config) -> LogitsMode:
    return "cached" if augmentation_is_identity(config) else "per-batch"


@torch.no_grad()
def precompute_logits(
    teacher: Teacher, split: Split, pixels: Preprocessing, device: torch.device, batch_size: int
) -> torch.Tensor:
    """The teacher's logits for every image of ``split``, unaugmented, in split order."""
    out = []
    for idx in progress(iter_batches(len(split), batch_size), desc="teacher", unit="batch"):
        out.append(teacher.logits(to_input(split.images[idx], pixels, device)))
    return torch.cat(out)


def distillation_objective(
    config,
    teacher: Teacher,
    train: Split,
    pixels: Preprocessing,
    device: torch.device,
    *,
    temperature: float,
    weight: float,
):
    """The training objective for :func:`model.train.fit`, and how the teacher's logits are got.

    ``config`` supplies the augmentation (which decides the mode), the label smoothing of the
    hard-label term and the batch size for precomputing.
    """
    if temperature <= 0 or not 0 <= weight <= 1:
        raise ValueError(
            f"distillation needs temperature > 0 and weight in [0, 1], got {temperature}, {weight}"
        )
    mode = teacher_logits_mode(config)
    cached = None
    if mode == "cached":
        cached = precompute_logits(teacher, train, pixels, device, config.eval_batch_size)
    smoothing = config.label_smoothing

    def objective(logits, y, x, idx):
        if cached is not None:
            target = cached[torch.from_numpy(np.asarray(idx)).to(cached.device)]
        else:
            target = teacher.logits(x)
        return distillation_loss(
            logits,
            target.to(logits.device),
            y,
            temperature=temperature,
            weight=weight,
            label_smoothing=smoothing,
        )

    log.info(
        "distilling from %s (%s), T=%g, weight %g, teacher logits %s",
        teacher.path,
        teacher.kind,
        temperature,
        weight,
        "computed once (no augmentation)" if cached is not None else "per augmented batch",
    )
    return objective, mode
