"""Warm start: a new search's study seeded with an earlier search's trials that fit its space.

    trials, left_out = warm_trials(Path("results/old"), space, max_epochs=10, metric="val_acc")

A trial of the earlier search fits when the configuration it trained is one the new space
can produce (its sampled values inside the new space's distributions, every value the new
space fixes equal to the one the trial had) and it has a value of the metric. It enters the
new study as the new budget sees it: its epochs up to the new max_epochs as intermediate
values, COMPLETE with its value there when it reached that epoch, PRUNED at its last epoch
otherwise; each carries the user attributes `warm_start_from` (the earlier experiment) and
`warm_start_trial` (its Ray trial id there). The seed baseline and failed trials are left out.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from ..config import TrainConfig
from ..errors import ConfigError, TuneAgeError
from .spaces import Space
from .study import STUDY_FILE, study_url
from .tracking import TRIALS_FILE, read_trials


def _inside(dist: Any, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return dist.low <= value <= dist.high


def _same_training(old: dict, new: dict, max_epochs: int) -> bool:
    """Whether two trial configs train the same model (epochs aside: the budget is the search's)."""
    def norm(config: dict) -> dict:
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        return TrainConfig.from_dict({**values, "epochs": max_epochs}).to_dict()

    return norm(old) == norm(new)


def warm_trials(source: str | Path, space: Space, max_epochs: int, metric: str) -> tuple[list[FrozenTrial], Counter]:
    """(trials for the new study, why the others were left out: reason -> count)."""
    source = Path(source).expanduser()
    meta_file = source / "tune_age.json"
    if not meta_file.is_file():
        raise TuneAgeError(f"--warm-start {source}: not a tune_age search folder (no tune_age.json); give "
                           "the folder `tune-age search` printed")
    meta = json.loads(meta_file.read_text())
    url = study_url(source, meta)
    if url.startswith("sqlite:") and not (source / STUDY_FILE).is_file():
        raise TuneAgeError(f"--warm-start {source}: its study ({STUDY_FILE}) is not in the folder")
    if meta.get("metric") != metric:
        raise ConfigError(f"--warm-start {source}: that search optimized {meta.get('metric')}, this one "
                          f"--metric {metric}; warm-start from a search of the same metric")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=meta["name"], storage=url)
    log = read_trials(source / TRIALS_FILE)
    taken: list[FrozenTrial] = []
    left_out: Counter = Counter()
    for old in study.get_trials(deepcopy=False):
        if old.user_attrs.get("baseline"):
            left_out["the seed baseline"] += 1
            continue
        entry = log.get(old.user_attrs.get("ray_trial_id", ""))
        values = {e: v for e, v in old.intermediate_values.items() if e <= max_epochs}
        if old.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not values or entry is None:
            left_out["failed or without a score"] += 1
            continue
        fixed = optuna.trial.FixedTrial(old.params)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FixedTrial warns of values outside a range: checked below
                config = space.suggest(fixed)
        except ValueError:  # the new space asks for a parameter the trial did not have
            left_out["a parameter the new space samples that the trial lacked"] += 1
            continue
        dists = fixed.distributions
        if not all(_inside(dists[name], old.params[name]) for name in dists):
            left_out["values outside the new space"] += 1
            continue
        if not _same_training(entry["config"], config, max_epochs):
            left_out["a configuration the new space cannot produce (fixed values differ)"] += 1
            continue
        complete = max_epochs in values
        taken.append(optuna.trial.create_trial(
            state=TrialState.COMPLETE if complete else TrialState.PRUNED,
            value=values[max_epochs] if complete else None,
            params={name: old.params[name] for name in dists},
            distributions=dists,
            intermediate_values=values,
            user_attrs={"warm_start_from": str(source.resolve()), "warm_start_trial": entry["trial_id"]},
        ))
    return taken, left_out


def describe(taken: int, left_out: Counter, source: str) -> str:
    why = "; ".join(f"{n} {reason}" for reason, n in left_out.most_common())
    return f"warm start: {taken} trial(s) from {source}" + (f" (left out: {why})" if why else "")
