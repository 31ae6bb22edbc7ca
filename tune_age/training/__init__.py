"""One training run over decoded data: set up, step an epoch, save and restore.

Shared by `tune-age train` (`train`, below) and the Ray Tune trainable, so both
build the model, optimizer and data tensors the same way and write the same
checkpoint format:

    run = start_run(cfg, data)
    for _ in range(cfg.epochs):
        metrics = run_epoch(run)     # train_* and val_* metrics
    torch.save(checkpoint_state(run), "checkpoint.pt")
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import engine
from ..config import TrainConfig
from ..data import FaceData
from ..data.groups import AgeGroups
from ..models import BACKBONES, apply_freeze, build_model
from ..models.weights import pretrained_state, weights_digest
from .features import feature_key, frozen_features, uses_frozen_features
from .selection import best_row

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tune_age.checkpoint"
CHECKPOINT_VERSION = 1
# glibc's malloc gives blocks of 32 MiB and more (the default CNN's first activations at
# batch 64) back to the OS when freed, and trims and drops thread heaps, so each batch
# page-faults ~100 MB of fresh zeroed memory again. Keep freed memory for the next batch:
# M_TRIM_THRESHOLD, M_TOP_PAD (stops thread arenas from dropping heaps), M_MMAP_THRESHOLD.
MALLOPT = {-1: 1 << 30, -2: 64 << 20, -3: 1 << 30}
# The environment of processes that run trials (search.start_ray gives it to Ray's workers).
# Ray Tune runs a trial in a thread whose malloc arena exists before keep_freed_memory() runs,
# and such a thread arena still page-faulted ~590k times an epoch (8 % slower) here; with one
# arena every thread uses the main heap that MALLOPT keeps. glibc reads it at process start.
TRIAL_PROCESS_ENV = {"MALLOC_ARENA_MAX": "1"}


@dataclass
class Run:
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    device: torch.device
    norm: engine.Normalizer
    augment: engine.Augment
    generator: torch.Generator
    groups: AgeGroups
    image_size: int
    mean: list[float]
    std: list[float]
    fingerprint: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    feature_source: str | None = None  # frozen-feature runs: "computed" or "cached"
    seen: np.ndarray | None = None  # image keys of the train and val images (data.image_keys)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor that shares memory with `array` (read-only arrays from Ray's object store too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # we never write to it
        return torch.from_numpy(array)


class SplitView:
    """The rows of one split of an image tensor, indexed like a tensor but never copied whole.

    On the CPU every trial reads the one image array (Ray's object store, shared between
    trials); a batch gathers its rows from it, as indexing a copy of the split would.
    """

    def __init__(self, images: torch.Tensor, rows: torch.Tensor):
        self.images, self.rows = images, rows
        self.device, self.dtype = images.device, images.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.images[self.rows[idx]]


def keep_freed_memory() -> None:
    """Lets glibc's malloc reuse freed memory instead of returning it to the OS (see MALLOPT).

    Process-wide; CPU training only. A no-op where the C library has no mallopt.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        for param, value in MALLOPT.items():
            mallopt(param, value)


def split_tensors(data: FaceData, image_size: int, device: torch.device) -> dict[str, Any]:
    """uint8 images, labels and ages per split, all three on `device`: the one placement rule.

    On the CPU the images stay in the shared array (a SplitView gathers each batch from it);
    on any other device a split's images, labels and ages move there once, together, so the
    engine indexes them all with indices on that device and nothing crosses per batch but
    the shuffled order.
    """
    images = as_tensor(data.images[image_size])
    out = {}
    for split in ("train", "val"):
        rows = data.splits[split]
        idx = torch.as_tensor(rows, dtype=torch.long)
        out[f"{split}_x"] = SplitView(images, idx) if device.type == "cpu" else images[idx].to(device)
        out[f"{split}_y"] = torch.as_tensor(data.labels[rows], dtype=torch.long).to(device)
        out[f"{split}_age"] = torch.as_tensor(data.ages[rows], dtype=torch.float32).to(device)
    return out


def input_norm(cfg: TrainConfig, data: FaceData) -> tuple[list[float], list[float]]:
    """The mean and std images are normalized with: the pretrained weights' own, else the
    train split's (data.mean, data.std)."""
    spec = BACKBONES[cfg.arch]
    if cfg.pretrained and spec.mean is not None:
        return list(spec.mean), list(spec.std)
    return list(data.mean), list(data.std)


def start_run(cfg: TrainConfig, data: FaceData, device: torch.device | None = None,
              weights: dict[str, torch.Tensor] | None = None, weights_id: str = "",
              weights_dir: str | None = None) -> Run:
    """Builds everything one training run needs; no epoch is run yet. With cfg.pretrained the
    body starts from `weights` (a state dict; a search's driver hands them to its trials), or
    else from the file models/weights.py finds (in `weights_dir` or torchvision's cache);
    `weights_id` (models.weights.weights_digest) keys their frozen features in the cache."""
    device = device or engine.resolve_device(cfg.device)
    image_size = data.resolve_size(cfg.image_size)
    if cfg.pretrained and weights is None:
        weights = pretrained_state(cfg.arch, weights_dir)
        weights_id = weights_digest(weights)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(data.groups), image_size, weights if cfg.pretrained else None,
                        data.groups).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions and pooling run faster on NHWC: 1.2-1.5x for the default CNN at
        # one thread (benchmarks/throughput.py); a checkpoint's weights load into either layout.
        model = model.to(memory_format=torch.channels_last)
        keep_freed_memory()
    optimizer = engine.build_optimizer(cfg, model)
    counts = torch.as_tensor(data.class_counts("train"))
    generator = torch.Generator().manual_seed(cfg.seed)
    mean, std = input_norm(cfg, data)
    norm = engine.Normalizer(mean, std, device)
    frozen = uses_frozen_features(cfg)
    # A frozen-feature run trains on features, so its images need not move to the device.
    tensors = split_tensors(data, image_size, torch.device("cpu") if frozen else device)
    feature_source = None
    if frozen:
        key = feature_key(cfg.arch, weights_id, image_size, mean, std, data.fingerprint)
        feats, feature_source = frozen_features(model, as_tensor(data.images[image_size]), norm, key)
        feats = torch.from_numpy(feats)
        for split in ("train", "val"):
            tensors[f"{split}_x"] = feats[torch.as_tensor(data.splits[split])].to(device)
            tensors[f"{split}_y"] = tensors[f"{split}_y"].to(device)
            tensors[f"{split}_age"] = tensors[f"{split}_age"].to(device)
    return Run(
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        scheduler=engine.build_scheduler(cfg, optimizer, cfg.epochs),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"
                                    and not torch.cuda.is_bf16_supported()),
        loss_fn=engine.build_loss(cfg, counts).to(device),
        device=device,
        norm=norm,
        augment=engine.Augment.from_config(cfg),
        generator=generator,
        groups=data.groups,
        image_size=image_size,
        mean=mean,
        std=std,
        fingerprint=data.fingerprint,
        tensors=tensors,
        feature_source=feature_source,
        seen=data.seen_keys(image_size),
    )


def run_epoch(run: Run) -> dict[str, Any]:
    """Trains one epoch and evaluates on the validation split; raises engine.Diverged.

    A frozen-feature run trains and evaluates the head alone on the cached features."""
    t = run.tensors
    amp = run.cfg.amp
    apply_freeze(run.model, run.cfg, run.epoch)
    heads_only = run.feature_source is not None
    module = run.model.classifier if heads_only else run.model
    norm = None if heads_only else run.norm
    train = engine.train_one_epoch(
        module, t["train_x"], t["train_y"], run.optimizer, run.loss_fn,
        batch_size=run.cfg.batch_size, norm=norm, augment=None if heads_only else run.augment,
        amp=amp, scaler=run.scaler, generator=run.generator,
    )
    if run.scheduler is not None:
        run.scheduler.step()
    val = engine.evaluate(
        module, t["val_x"], t["val_y"], norm=norm, num_classes=len(run.groups),
        ages=t["val_age"], centers=run.groups.centers, amp=amp,
    )
    run.epoch += 1
    metrics = {
        "epoch": run.epoch,
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "images_per_sec": train["images_per_sec"],
        "epoch_seconds": train["seconds"],
        "val_loss": val["loss"],
        "val_acc": val["accuracy"],
        "val_one_off": val["one_off"],
        "val_f1": val["macro_f1"],
        "val_balanced_acc": val["balanced_accuracy"],
        "val_mae": val["mae"],
        "val_n": len(t["val_y"]),  # what the validation figures rest on
        "val_confusion": val["confusion"],
    }
    run.history.append({k: v for k, v in metrics.items() if k != "val_confusion"})
    return metrics


def checkpoint_state(run: Run, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything to resume training or to predict; loads with torch.load(weights_only=True)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "scaler": run.scaler.state_dict(),
        "rng": run.generator.get_state(),  # augmentation and the shuffled order
        # dropout draws from torch's global generators: without them a resumed run would
        # not retrain the epochs it repeats the way they first ran
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
        "config": run.cfg.to_dict(),
        "groups": run.groups.to_dict(),
        "norm": {"mean": run.mean, "std": run.std},
        "image_size": run.image_size,
        "epoch": run.epoch,
        "metrics": {k: v for k, v in (metrics or {}).items()},
        "history": run.history,
        "data_fingerprint": run.fingerprint,
        # What the model saw in training or validation, so evaluate can leave those images out.
        "seen_images": torch.from_numpy(run.seen) if run.seen is not None else None,
    }


def restore_run(run: Run, state: dict[str, Any]) -> None:
    """Continues `run` from a checkpoint written by `checkpoint_state`."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.generator.set_state(state["rng"])
    if state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), run.device)
    run.epoch = int(state["epoch"])
    run.history = list(state.get("history", []))


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        # mkstemp makes the file owner-only; a checkpoint gets the usual mode (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train(
    cfg: TrainConfig,
    data: FaceData,
    out_dir: str | Path,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """`tune-age train`: runs cfg.epochs epochs, saving checkpoint.pt and best.pt in out_dir.

    Returns the metrics of the best epoch (by val_acc, ties as training.selection decides).
    """
    out_dir = Path(out_dir)
    run = start_run(cfg, data, weights=weights)
    best: dict[str, Any] | None = None
    for _ in range(cfg.epochs):
        metrics = run_epoch(run)
        state = checkpoint_state(run, metrics)
        save_atomic(state, out_dir / "checkpoint.pt")
        if best is None or best_row([best, metrics], "val_acc") is metrics:
            best = metrics
            save_atomic(state, out_dir / "best.pt")
        if on_epoch:
            on_epoch(metrics)
    return best or {}
