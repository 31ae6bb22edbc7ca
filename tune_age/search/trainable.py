"""The Ray Tune trainable: a thin wrapper over `training.py`.

The driver decodes the data once and hands it to every trial through
`tune.with_parameters`, so trials read the images from Ray's object store
(zero-copy on the same node), or map the driver's decode-cache file
(data/mapped.py), and never touch the image files. Each epoch
reports the metrics and a checkpoint; a restarted trial continues from
`tune.get_checkpoint()`, and one that had already finished (its last
checkpoint holds every epoch) ends at once without training or reporting again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from ..config import METRICS, TrainConfig
from ..data import FaceData
from ..training.engine import Diverged
from .searcher import BASELINE_KEY
from ..training import checkpoint_state, restore_run, run_epoch, start_run
from ..training.latency import latency
from ..training.crossval import cv_checkpoint_state, restore_cv, run_cv_epoch, start_cv
from ..training.selection import SCORE_KEY, selection_score

CHECKPOINT_FILE = "checkpoint.pt"
WORST = {name: (0.0 if mode == "max" else 1e9) for name, mode in METRICS.items()}
CRASH_ENV = "TUNE_AGE_TEST_CRASH"  # tests only: "EPOCH:MARKER_DIR" crashes once per trial


def trial_config(config: dict[str, Any], max_epochs: int) -> TrainConfig:
    """Ray's config dict -> TrainConfig; the only place that reads Ray's config."""
    values = {k: v for k, v in config.items() if k != BASELINE_KEY}
    return TrainConfig.from_dict({**values, "epochs": max_epochs}, source="trial config")


def _reported(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "val_confusion"}


def _maybe_crash(epoch: int) -> None:
    """Injected failure for the retry tests: the first attempt of each trial dies at EPOCH."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    at, marker_dir = spec.split(":", 1)
    marker = Path(marker_dir) / tune.get_context().get_trial_id()
    if epoch == int(at) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected crash at epoch {epoch}")


def train_trial(config: dict[str, Any], data: FaceData, max_epochs: int, metric: str = "val_acc",
                weights: dict[str, dict] | None = None, cv: int = 1, measure: bool = False) -> None:
    """One trial; `weights`: arch -> {"state", "id"} of the pretrained bodies the space can ask
    for, loaded once by the driver (trials never look for weight files); `cv` > 1 trains that
    many folds of train+val in lockstep (training/crossval.py) and reports their pooled scores;
    `measure`: time the model's inference on this trial's device (training/latency.py) before
    training and report it with every epoch, for a search of accuracy against latency."""
    cfg = trial_config(config, max_epochs)
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    gpu_ids = ray.get_gpu_ids()
    device = torch.device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")
    info = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "device": device.type,
        "gpu_ids": [str(g) for g in gpu_ids],
        "baseline": bool(config.get(BASELINE_KEY)),
        "images_from": data.open_mapped(),  # from the object store, or mapped from a file (fetched once per node)
    }
    pretrained = (weights or {}).get(cfg.arch) if cfg.pretrained else None
    if cfg.pretrained and pretrained is None:
        raise RuntimeError(f"the driver loaded no pretrained weights for arch={cfg.arch}")
    given = (pretrained["state"], pretrained["id"]) if pretrained else ()
    if cv > 1:
        run = start_cv(cfg, data, cv, device, *given)
        step, state_of, restore = run_cv_epoch, cv_checkpoint_state, restore_cv
    else:
        run = start_run(cfg, data, device, *given)
        step, state_of, restore = run_epoch, checkpoint_state, restore_run
    info["features"] = run.feature_source or "none"
    if measure:
        one = run.runs[0] if cv > 1 else run
        info.update(latency(one.model, one.image_size, device, one.norm))
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        restore(run, state)
        if run.epoch >= cfg.epochs:  # finished before the driver stopped: nothing to redo
            return
    while run.epoch < cfg.epochs:
        _maybe_crash(run.epoch + 1)
        try:
            metrics = step(run)
        except Diverged as exc:
            tune.report({**WORST, "epoch": run.epoch + 1, "diverged": True, "error": str(exc), **info})
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state_of(run, metrics), Path(folder) / CHECKPOINT_FILE)
            # Ray keeps each trial's checkpoints by this score: the epochs the tie rule names
            tune.report(
                {**_reported(metrics), **info, "diverged": False,
                 SCORE_KEY: selection_score(metrics, metric)},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )
