"""Refit: the best configuration retrained on train+val, scored once on the test split.

A search chooses a configuration and an epoch count on validation; with small data the
model trained on train alone (or on one fold) wastes the validation images. `refit`
retrains the best trial's configuration on train+val together, for the search's epoch
budget's schedule up to the best epoch (the learning-rate schedule runs as it did in the
trial, so the weights at that epoch are trained as the chosen ones were), then evaluates it
once on the test split, which no choice has seen.

    state, test = refit(load_experiment(exp_dir))   # a checkpoint state and its test metrics
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..data import channel_stats
from ..errors import TuneAgeError
from . import Experiment, hyperparameters
from .report import load_search_data

progress = logging.getLogger("tune_age.progress")


def refit(exp: Experiment, entry: dict[str, Any] | None = None, epochs: int | None = None
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint state of the refit model, its metrics on the test split, with n_train)."""
    from ..training import checkpoint_state, run_epoch, start_run

    entry = entry or exp.best_trial()
    if entry is None or not (epochs or entry.get("best_epoch")):
        raise TuneAgeError(f"{exp.path}: no trial has a best epoch yet; nothing to refit")
    epochs = int(epochs or entry["best_epoch"])
    cfg = TrainConfig.from_dict({**hyperparameters(entry), "epochs": int(exp.meta["max_epochs"])})
    data, why = load_search_data(exp, [cfg.image_size])
    if data is None:
        raise TuneAgeError(f"cannot refit: {why}")
    if not len(data.splits["test"]):
        raise TuneAgeError(f"{exp.path}: the search's data has no test split (test_fraction=0), so a "
                           "refit model could not be scored on images no choice has seen")
    train = sorted([*data.splits["train"], *data.splits["val"]])
    mean, std = channel_stats(data.images[max(data.images)], train)
    refit_data = dataclasses.replace(
        data, splits={"train": np.asarray(train, dtype=np.int64), "val": data.splits["test"],
                      "test": data.splits["test"]}, mean=mean, std=std)
    weights_dir = (exp.meta.get("search") or {}).get("weights_dir")
    run = start_run(cfg, refit_data, weights_dir=weights_dir)
    run.seen = data.seen_keys(run.image_size)  # it saw train and val; the test split stays unseen
    progress.info(f"refit: trial {entry['trial_id']}'s configuration on train+val ({len(train)} images), "
                  f"{epochs} of {cfg.epochs} scheduled epochs")
    metrics: dict[str, Any] = {}
    for _ in range(epochs):
        metrics = run_epoch(run)  # its "val" is the test split: read once, below, never chosen by
    test = {k.replace("val_", "test_"): v for k, v in metrics.items() if k.startswith("val_")}
    test["n_train"] = len(train)
    state = checkpoint_state(run, {"epoch": epochs, **test, "train_loss": metrics.get("train_loss")})
    return state, test
