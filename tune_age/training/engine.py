"""Pure PyTorch training and evaluation: no Ray, no printing, no files.

Images travel as one uint8 tensor (N x 3 x S x S) that stays on the device
(or in shared CPU memory); each batch is indexed, converted, augmented and
normalized as a whole tensor, so there is no per-image Python work and no
host synchronisation inside the loop.

    optimizer = build_optimizer(cfg, model)
    stats = train_one_epoch(model, images, labels, optimizer, loss_fn,
                            batch_size=64, norm=norm, augment=Augment.from_config(cfg))
    metrics = evaluate(model, val_images, val_labels, norm=norm, num_classes=10)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig


DIVERGENCE_FACTOR = 100.0  # a mean loss this many times chance level has diverged


class Diverged(RuntimeError):
    """The training loss became NaN, infinite, or far above chance level."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


class Normalizer:
    """uint8 pixels -> float, scaled to zero mean and unit variance per channel."""

    def __init__(self, mean: Iterable[float], std: Iterable[float], device: torch.device):
        std_t = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = mean_t / std_t
        self.mean, self.std = mean_t, std_t

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(1.0 / 255.0)

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(-self.shift, x.float(), self.scale)


@dataclass
class Augment:
    """Whole-batch augmentation: horizontal flip, random resized crop, color jitter."""

    flip: bool = False
    crop_scale: float = 1.0
    color_jitter: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Augment":
        return cls(cfg.flip, cfg.crop_scale, cfg.color_jitter)

    @property
    def active(self) -> bool:
        return self.flip or self.crop_scale < 1.0 or self.color_jitter > 0

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """x: float images in [0, 1], B x 3 x S x S; returns the same shape."""
        b, dev = x.shape[0], x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen).to(dev, non_blocking=True)

        if self.crop_scale < 1.0:
            # One affine warp per image does crop, rescale and flip together.
            area = self.crop_scale + (1 - self.crop_scale) * rand(b)
            ratio = torch.exp((rand(b) - 0.5) * 2 * math.log(4 / 3))
            w = torch.sqrt(area * ratio).clamp(max=1.0)
            h = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (1 - w) * (2 * rand(b) - 1)
            ty = (1 - h) * (2 * rand(b) - 1)
            if self.flip:
                w = torch.where(rand(b) < 0.5, -w, w)
            zero = torch.zeros_like(w)
            theta = torch.stack([torch.stack([w, zero, tx], 1), torch.stack([zero, h, ty], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        elif self.flip:
            x = torch.where((rand(b) < 0.5).view(b, 1, 1, 1), x.flip(3), x)
        if self.color_jitter > 0:
            j = self.color_jitter
            bright = 1 + j * (2 * rand(b, 1, 1, 1) - 1)
            contrast = 1 + j * (2 * rand(b, 1, 1, 1) - 1)
            sat = 1 + j * (2 * rand(b, 1, 1, 1) - 1)
            x = x * bright
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = gray + (x - gray) * sat
            x = x.clamp_(0, 1)
        return x


OPTIMIZERS = {
    "adam": lambda cfg, params: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda cfg, params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "sgd": lambda cfg, params: torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
    ),
}

SCHEDULES = {
    "none": lambda cfg, opt, epochs: None,
    "cosine": lambda cfg, opt, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)),
    "step": lambda cfg, opt, epochs: torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma),
}


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over two groups: the body (`model.features`) at lr x backbone_lr_scale,
    everything else (pool, head) at lr. Frozen parameters get no gradient, so no step."""
    body = list(model.features.parameters())
    ids = {id(p) for p in body}
    head = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": body, "lr": cfg.lr * cfg.backbone_lr_scale}, {"params": head, "lr": cfg.lr}]
    return OPTIMIZERS[cfg.optimizer](cfg, [g for g in groups if g["params"]])


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """Stepped once per epoch; None for a constant learning rate."""
    return SCHEDULES[cfg.schedule](cfg, optimizer, epochs)


class AgeLoss(nn.Module):
    """Cross-entropy over the age groups, with optional label smoothing and class weights.

    Only groups that have training images count: label smoothing spreads its mass over
    them alone, and with `class_weighting` each image weighs N / (K * n_group) for the K
    groups present (groups with no image get no weight at all). Each image's smoothed loss is
    multiplied by its own group's weight, and the batch loss is the weighted mean. PyTorch's
    CrossEntropyLoss(weight=..., label_smoothing=...) instead weights the smoothing term
    per target class, so a rare or empty group's large weight enters every image's loss and
    a model can learn to predict a group that has no training image at all.
    """

    def __init__(self, class_counts: torch.Tensor, weighting: bool = False, smoothing: float = 0.0):
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float32)
        present = counts > 0
        if not present.any():
            raise ValueError("no group has a training image")
        k = present.sum()
        weight = torch.where(present, counts.sum() / (k * counts.clamp(min=1)), torch.zeros_like(counts))
        self.register_buffer("weight", weight if weighting else present.float())
        self.register_buffer("present", present.float())
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        loss = -logp.gather(1, target[:, None])[:, 0]
        if self.smoothing > 0:
            uniform = -(logp * self.present).sum(1) / self.present.sum()
            loss = (1 - self.smoothing) * loss + self.smoothing * uniform
        w = self.weight[target]
        return (loss * w).sum() / w.sum().clamp(min=1e-12)


def build_loss(cfg: TrainConfig, class_counts: torch.Tensor) -> nn.Module:
    """The training loss for the train split's per-group image counts (see AgeLoss)."""
    return AgeLoss(class_counts, weighting=cfg.class_weighting, smoothing=cfg.label_smoothing)


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when asked and supported; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _batches(n: int, batch_size: int, order: torch.Tensor, min_last: int = 1):
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < min_last:
            break
        yield idx


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    batch_size: int,
    norm: Normalizer | None,
    augment: Augment | None = None,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One pass over (images, labels) in a random order; returns loss, acc, images_per_sec.

    `images` is uint8 on the model's device (or CPU), or, with norm=None, inputs the model
    takes as they are (frozen features); raises Diverged when the loss is not finite.
    """
    device = next(model.parameters()).device
    if images.device != labels.device:
        raise ValueError(f"images on {images.device} but labels on {labels.device}: a split's tensors "
                         "must share one device (training.split_tensors places them)")
    model.train()
    n = len(labels)
    order = torch.randperm(n, generator=generator).to(images.device)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    # A batch of one breaks batch-norm in training mode; drop such a remainder.
    for idx in _batches(n, batch_size, order, min_last=2 if n > 1 else 1):
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        if norm is None:  # inputs that need no preprocessing (frozen features)
            x = x.float()
        elif augment is not None and augment.active:
            x = norm.from_unit(augment(norm.to_unit(x), generator))
        else:
            x = norm(x)
        with autocast_for(device, amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    loss_value = total_loss.item() / max(seen, 1)
    seconds = time.perf_counter() - start
    # Cross-entropy at chance is ln(classes); ReLU nets often blow up to huge
    # finite losses rather than NaN, so both count as divergence.
    limit = DIVERGENCE_FACTOR * math.log(max(int(logits.shape[1]), 2)) if seen else math.inf
    if not math.isfinite(loss_value) or loss_value > limit:
        raise Diverged(f"training loss diverged to {loss_value:.4g} (try a lower lr)")
    return {
        "loss": loss_value,
        "acc": correct.item() / max(seen, 1),
        "images_per_sec": seen / max(seconds, 1e-9),
        "seconds": seconds,
    }


# Evaluation batches on the CPU hold about this many pixels (256 images at 64 px, 64 at 128 px):
# a batch's activations are the largest block a CPU trial allocates, and glibc keeps it
# for the next (training.MALLOPT), so 256 images at 128 px held ~0.5 GiB per trial for good.
CPU_EVAL_PIXELS = 256 * 64 * 64


def eval_batch(images: torch.Tensor, device: torch.device) -> int:
    """Images per evaluation batch: 256, or on the CPU what CPU_EVAL_PIXELS allows (>= 8)."""
    if device.type != "cpu" or not len(images):
        return 256
    height, width = images[:1].shape[-2:]  # a tensor, or a training.SplitView of one
    return max(8, min(256, CPU_EVAL_PIXELS // max(1, height * width)))


def gather_batches(images, batch_size: int, fn, device: torch.device) -> torch.Tensor | None:
    """fn(batch) for every `batch_size` images, in order, as one float32 tensor on `device`
    (None for no images). The tensor is made at the first batch, so nothing kept per batch
    sits between the freed batches' blocks in the heap: on the CPU, where freed memory stays
    with the process (training.MALLOPT), a list of per-batch outputs fragmented it until each
    batch took new memory: a trial worker of benchmarks/out_of_core.py held 1,103 MiB with
    the list, 697 MiB this way."""
    out = None
    for start in range(0, len(images), batch_size):
        y = fn(images[start:start + batch_size])
        if out is None:
            out = torch.empty((len(images), *y.shape[1:]), device=device)
        out[start:start + len(y)] = y
        del y
    return out


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, *, norm: Normalizer | None, batch_size: int | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Logits for every image, on the model's device, in input order; `batch_size` images at
    a time (default: eval_batch)."""
    device = next(model.parameters()).device
    model.eval()

    def logits(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=True)
        x = x.float() if norm is None else norm(x)
        with autocast_for(device, amp):
            return model(x)

    out = gather_batches(images, batch_size or eval_batch(images, device), logits, device)
    return torch.zeros((0, 0), device=device) if out is None else out


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, one_off, macro_f1 and balanced_accuracy of a confusion matrix (rows: truth)."""
    confusion = torch.as_tensor(confusion).long()
    num_classes = confusion.shape[0]
    tp = confusion.diag().float()
    truth = confusion.sum(1).float()  # rows: true class
    predicted = confusion.sum(0).float()
    present = (truth + predicted) > 0
    f1 = torch.where(present, 2 * tp / (truth + predicted).clamp(min=1), torch.zeros_like(tp))
    recall = tp / truth.clamp(min=1)
    n = max(int(confusion.sum()), 1)
    i, j = torch.meshgrid(torch.arange(num_classes), torch.arange(num_classes), indexing="ij")
    near = confusion[(i - j).abs() <= 1].sum().item()
    return {
        "accuracy": (tp.sum() / n).item(),
        "one_off": near / n,
        "macro_f1": (f1[present].mean().item() if present.any() else 0.0),
        "balanced_accuracy": (recall[truth > 0].mean().item() if (truth > 0).any() else 0.0),
    }


def classification_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ages: torch.Tensor | None = None,
    centers: list[float] | None = None,
) -> dict[str, Any]:
    """accuracy, one_off, macro_f1, balanced_accuracy, mae (years, None without ages), confusion."""
    pred, target = pred.cpu().long(), target.cpu().long()
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(
        num_classes, num_classes
    )
    mae = None
    if ages is not None and centers is not None:
        ages = ages.cpu().float()
        known = ~torch.isnan(ages)
        if known.any():
            guess = torch.tensor(centers, dtype=torch.float32)[pred]
            mae = (guess[known] - ages[known]).abs().mean().item()
    return {**confusion_metrics(confusion), "mae": mae, "confusion": confusion.tolist()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: Normalizer | None,
    num_classes: int,
    loss_fn: nn.Module | None = None,
    ages: torch.Tensor | None = None,
    centers: list[float] | None = None,
    batch_size: int | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """Loss and classification metrics of `model` on a labelled set."""
    logits = predict_logits(model, images, norm=norm, batch_size=batch_size, amp=amp)
    target = labels.to(logits.device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    loss = loss_fn(logits, target).item() if len(target) else float("nan")
    pred = logits.argmax(1)
    metrics = classification_metrics(pred, target, num_classes, ages, centers)
    return {"loss": loss, **metrics, "pred": pred.cpu()}
