"""Training: seeded, augmented on whole batches in torch, evaluated on the test set every epoch.

The uint8 images from :mod:`model.data` are normalised per batch with the service's own
``normalize`` and only then augmented, so a padded border is exactly a black pixel.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.data import Split, iter_batches, progress
from model.evaluate import evaluate, to_input
from model.network import MobileNetV1
from model.recipes import BuildConfig
from sepconv.hardware import available_cores
from sepconv.preprocess import Preprocessing

log = logging.getLogger(__name__)

#: Training batches per epoch under ``--dry-run``.
DRY_RUN_STEPS = 3


def autocast(device: torch.device):
    # bf16 on a GPU doubles throughput and needs no loss scaling; the CPU stays in fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    return device


def configure_cpu_threads() -> int:
    """One intra-op thread per CPU this process may run on (cgroups and taskset included)."""
    torch.set_num_threads(available_cores())
    return torch.get_num_threads()


def model_args(config: BuildConfig, num_classes: int, channels: int) -> dict:
    """Everything :class:`MobileNetV1` needs to be rebuilt from a checkpoint."""
    return {
        "num_classes": num_classes,
        "in_channels": channels,
        "alpha": config.alpha,
        "stem_stride": config.resolved_stem_stride(),
        "dropout": config.dropout,
        "conv": config.conv,
    }


def augment(x: torch.Tensor, config: BuildConfig, fill: torch.Tensor, gen: torch.Generator):
    """Random crop from a padded image, horizontal flip and random erasing, per sample.

    ``fill`` is the normalised value of a black pixel per channel; random numbers come from
    ``gen`` on the CPU so a seed gives the same augmentation on any device.
    """
    n, c, h, w = x.shape
    dev = x.device
    p = config.crop_padding
    if p:
        padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen).to(dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=gen).to(dev)
        rows = (dy + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
        cols = (dx + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
        batch = torch.arange(n, device=dev)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if config.hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    if config.erase_prob > 0:
        # Erase a rectangle of 2-25% of the area, aspect 0.3-3.3, to the mean (0 after
        # normalisation), as in Zhong et al.'s random erasing.
        area = torch.empty(n).uniform_(0.02, 0.25, generator=gen) * h * w
        aspect = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=gen))
        eh = torch.sqrt(area * aspect).clamp(1, h).long()
        ew = torch.sqrt(area / aspect).clamp(1, w).long()
        y0 = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
        x0 = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
        on = torch.rand(n, generator=gen) < config.erase_prob
        ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
        in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])
        in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])
        mask = (in_y[:, :, None] & in_x[:, None, :] & on[:, None, None]).to(dev)
        x = x.masked_fill(mask[:, None], 0.0)
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


def build_optimizer(net: nn.Module, config: BuildConfig) -> torch.optim.Optimizer:
    # No weight decay on BN affine parameters and biases (1-d tensors): decaying them only
    # fights the normalisation.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def build_schedule(opt, config: BuildConfig, total_steps: int):
    """Per-step learning-rate factor: linear warm-up, then cosine annealing.

    ``onecycle`` follows torch's ``OneCycleLR`` shape (start at lr/25, peak at lr, end at
    lr/25000, no momentum cycling); ``cosine`` warms up from 0 and anneals to 0. Written as a
    ``LambdaLR`` because ``OneCycleLR`` divides by zero on the few steps of a dry run.
    """
    total_steps = max(1, total_steps)
    warmup = min(total_steps - 1, round(config.warmup_epochs / max(config.epochs, 1) * total_steps))
    start, end = (1 / 25, 1 / 25_000) if config.schedule == "onecycle" else (0.0, 0.0)

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


#: The training loss: ``objective(logits, targets, inputs, indices)`` -> scalar. ``inputs`` is the
#: augmented batch the student saw and ``indices`` its rows in the training split, so an
#: objective can run a teacher on the same augmented images or look up precomputed outputs.
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray], torch.Tensor]


def cross_entropy_objective(config: BuildConfig) -> Objective:
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def objective(logits, y, _x, _idx):
        return criterion(logits, y)

    return objective


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    images_per_second: float
    seconds: float


@dataclass
class TrainResult:
    net: nn.Module  # carrying the best weights, in eval mode, on the CPU
    model_args: dict
    best_epoch: int
    best_accuracy: float
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def train_one_epoch(
    net,
    opt,
    sched,
    split: Split,
    pixels: Preprocessing,
    device,
    config,
    gen,
    rng,
    fill,
    *,
    epoch: int,
    max_steps: int | None,
    objective: Objective | None = None,
) -> tuple[float, float, float]:
    net.train()
    objective = objective or cross_entropy_objective(config)
    order = iter_batches(len(split), config.batch_size, rng=rng, drop_last=True)
    if max_steps is not None:
        order = order[:max_steps]
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = progress(order, desc=f"epoch {epoch}/{config.epochs}", unit="batch")
    for idx in bar:
        x = augment(to_input(split.images[idx], pixels, device, False), config, fill, gen)
        y = torch.from_numpy(split.labels[idx]).to(device)
        with autocast(device):
            logits = net(x)
            loss = objective(logits.float(), y, x, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        n = len(idx)
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(
            loss=f"{loss_sum / seen:.3f}",
            acc=f"{correct / seen:.3f}",
            img_s=f"{rate:.0f}",
            refresh=False,
        )
    return loss_sum / max(seen, 1), correct / max(seen, 1), seen / (time.perf_counter() - start)


def fit(
    config: BuildConfig,
    train: Split,
    test: Split,
    pixels: Preprocessing,
    num_classes: int,
    *,
    checkpoint: Path | None = None,
    net: MobileNetV1 | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train ``config.epochs`` epochs and return the network with the best test accuracy.

    ``net`` continues training a given network (e.g. fine-tuning after pruning, its own
    architecture kept) instead of a fresh one; ``objective`` replaces the cross-entropy loss
    (e.g. distillation).
    """
    seed_everything(config.seed)
    device = pick_device(config.device)
    if device.type == "cpu":
        configure_cpu_threads()
    if net is None:
        net = MobileNetV1(**model_args(config, num_classes, pixels.channels))
    else:
        net = copy.deepcopy(net)  # trained in place below; the caller's network stays as it was
    args = net.constructor_args()
    net = net.to(device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(config.seed)
    max_steps = DRY_RUN_STEPS if config.dry_run else None
    rng = np.random.default_rng(config.seed)
    steps = len(iter_batches(len(train), config.batch_size, drop_last=True))
    if max_steps is not None:
        steps = min(steps, max_steps)
    opt = build_optimizer(net, config)
    sched = build_schedule(opt, config, steps * config.epochs)
    fill = torch.tensor(
        [-m / s for m, s in zip(pixels.mean, pixels.std, strict=True)],
        dtype=torch.float32,
        device=device,
    )
    log.info(
        "training on %s (%d thread(s)), %d train / %d test images, %d step(s)/epoch",
        device,
        torch.get_num_threads(),
        len(train),
        len(test),
        steps,
    )
    best_state, best_acc, best_epoch, history = None, -1.0, 0, []
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        train_loss, train_acc, rate = train_one_epoch(
            net,
            opt,
            sched,
            train,
            pixels,
            device,
            config,
            gen,
            rng,
            fill,
            epoch=epoch,
            max_steps=max_steps,
            objective=objective,
        )
        test_loss, test_acc = evaluate(
            net,
            test,
            pixels,
            device=device,
            batch_size=config.eval_batch_size,
            channels_last=config.channels_last,
            desc=f"test {epoch}",
        )
        stats = EpochStats(
            epoch, train_loss, train_acc, test_loss, test_acc, rate, time.perf_counter() - t0
        )
        history.append(stats)
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.0f img/s, %.1f s",
            epoch,
            config.epochs,
            train_loss,
            train_acc,
            test_loss,
            test_acc,
            rate,
            stats.seconds,
        )
        if test_acc > best_acc:
            best_acc, best_epoch = test_acc, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint, best_state, args, epoch, test_acc, config, pixels=pixels
                )
    seconds = time.perf_counter() - start
    best = MobileNetV1(**args)
    best.load_state_dict(best_state if best_state is not None else copy.deepcopy(net.state_dict()))
    return TrainResult(best.eval(), args, best_epoch, best_acc, history, seconds, str(device))


def save_checkpoint(
    path: Path,
    state: dict,
    args: dict,
    epoch: int,
    accuracy: float,
    config: BuildConfig,
    *,
    pixels: Preprocessing | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model_args": args,
            "state_dict": state,
            "epoch": epoch,
            "test_accuracy": accuracy,
            "config": config.model_dump(),
            # The preprocessing the weights expect: a teacher loaded from this checkpoint must
            # see the same pixels as its student.
            "pixels": pixels.model_dump() if pixels is not None else None,
        },
        tmp,
    )
    tmp.replace(path)  # a crash mid-save never leaves a half-written checkpoint


def load_checkpoint(path: str | Path) -> tuple[MobileNetV1, dict]:
    """Rebuild the network from a checkpoint written by :func:`save_checkpoint`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = MobileNetV1(**ckpt["model_args"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), ckpt
