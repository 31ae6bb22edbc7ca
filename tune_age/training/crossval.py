"""Cross-validation inside one trial: K folds of train+val trained in lockstep.

When the validation split is too small to choose a configuration by (a few dozen images),
each trial trains K models, fold i validating on the i-th of K stratified parts of
train+val and training on the rest; the test split is in no fold. Every epoch reports the
pooled figures (every train+val image predicted once, by the model that did not train on
it: accuracy over all of them), the spread across folds (`val_acc_std`), and the fold count,
so Tune and ASHA see one number per epoch as with a single split.

    cv = start_cv(cfg, data, k=5)
    metrics = run_cv_epoch(cv)           # val_acc pooled over the folds, val_acc_std, ...
    state = cv_checkpoint_state(cv)      # every fold; fold 1's model at the top level
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..data import FaceData, channel_stats
from . import Run, checkpoint_state, restore_run, run_epoch, start_run
from .engine import confusion_metrics

MIN_VAL_IMAGES = 200  # a validation split smaller than this chooses by noise: cross-validate
DEFAULT_FOLDS = 5
SPREAD = ("val_acc", "val_one_off", "val_f1", "val_balanced_acc", "val_loss")


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint positions into `labels` covering all of them, each group dealt round-robin
    over the folds after a seeded shuffle (so each fold holds each group's share)."""
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for group in np.unique(labels):
        rows = np.flatnonzero(labels == group)
        np.random.default_rng([seed, int(group)]).shuffle(rows)
        for j, r in enumerate(rows):
            folds[(j + offset) % k].append(int(r))
        offset += len(rows)  # the next group starts where this one stopped: even fold sizes
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def fold_data(data: FaceData, k: int, seed: int) -> list[FaceData]:
    """The K views of `data` whose train/val splits are the folds of its train+val rows."""
    pool = np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))
    parts = stratified_folds(data.labels[pool], k, seed)
    out = []
    for i in range(k):
        val = pool[parts[i]]
        train = pool[np.concatenate([parts[j] for j in range(k) if j != i])]
        train.sort()
        mean, std = channel_stats(data.images[max(data.images)], train)
        out.append(dataclasses.replace(
            data, splits={"train": train, "val": val, "test": data.splits["test"]}, mean=mean, std=std,
        ))
    return out


@dataclass
class CVRun:
    runs: list[Run]

    @property
    def cfg(self) -> TrainConfig:
        return self.runs[0].cfg

    @property
    def epoch(self) -> int:
        return self.runs[0].epoch

    @property
    def feature_source(self) -> str | None:
        return self.runs[0].feature_source


def start_cv(cfg: TrainConfig, data: FaceData, k: int, device: torch.device | None = None,
             weights: dict | None = None, weights_id: str = "", seed: int | None = None) -> CVRun:
    """K runs, one per fold (fold seeds follow the data's split seed unless given)."""
    folds = fold_data(data, k, data_seed(data) if seed is None else seed)
    return CVRun([start_run(cfg, d, device, weights, weights_id) for d in folds])


def data_seed(data: FaceData) -> int:
    return int(data.fingerprint[:8], 16)  # fixed by the data, its bins and its split settings


def run_cv_epoch(cv: CVRun) -> dict[str, Any]:
    """One epoch of every fold; the pooled metrics, their spread over folds, and the folds'."""
    per_fold = [run_epoch(r) for r in cv.runs]
    confusion = np.sum([np.asarray(m["val_confusion"]) for m in per_fold], axis=0)
    pooled = confusion_metrics(torch.as_tensor(confusion))
    sizes = np.array([m["val_n"] for m in per_fold], dtype=float)
    first = per_fold[0]
    metrics = {
        "epoch": first["epoch"],
        "train_loss": float(np.average([m["train_loss"] for m in per_fold], weights=sizes)),
        "train_acc": float(np.average([m["train_acc"] for m in per_fold], weights=sizes)),
        "images_per_sec": float(np.sum([m["images_per_sec"] for m in per_fold]) / len(per_fold)),
        "epoch_seconds": float(np.sum([m["epoch_seconds"] for m in per_fold])),
        "val_loss": float(np.average([m["val_loss"] for m in per_fold], weights=sizes)),
        "val_acc": pooled["accuracy"],
        "val_one_off": pooled["one_off"],
        "val_f1": pooled["macro_f1"],
        "val_balanced_acc": pooled["balanced_accuracy"],
        "val_mae": (float(np.average([m["val_mae"] for m in per_fold], weights=sizes))
                    if all(m["val_mae"] is not None for m in per_fold) else None),
        "val_n": int(sizes.sum()),
        "val_confusion": confusion.tolist(),
        "cv_folds": len(per_fold),
    }
    for key in SPREAD:
        metrics[f"{key}_std"] = float(np.std([m[key] for m in per_fold], ddof=1)) if len(per_fold) > 1 else 0.0
    metrics["fold_val_acc"] = [m["val_acc"] for m in per_fold]
    return metrics


def cv_checkpoint_state(cv: CVRun, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fold 1's checkpoint (so that export and predict can use it as any checkpoint), with
    every fold's state under "folds" to resume from."""
    states = [checkpoint_state(r) for r in cv.runs]
    return {**states[0], "metrics": dict(metrics or {}), "folds": states, "cv_folds": len(states)}


def restore_cv(cv: CVRun, state: dict[str, Any]) -> None:
    for run, fold in zip(cv.runs, state["folds"]):
        restore_run(run, fold)
