"""`StudySearch`: Ray Tune's OptunaSearch, made right for tune_age's searches.

What differs from the stock searcher:
- the study holds what the trials measured: each epoch's value is an intermediate value at
  that epoch, the last one included. Ray passes the result on which the scheduler stops a
  trial to `on_trial_complete` only (tune_controller: "Only updating search alg if the trial
  is not to be stopped"), so it is reported there before the trial is told;
- a trial the scheduler stopped early (fewer epochs than the budget) is told to the study as
  PRUNED, a diverged one as FAIL; stock Ray records both as COMPLETE with a partial-budget
  score, which misleads TPE;
- the seed baseline runs first as a full configuration outside the space: a study trial
  asked for like any other but with no sampled parameters (TPE learns nothing from it), its
  configuration in the user attribute `config`, `baseline` true, its epochs as intermediate
  values and its real start and end;
- after `Tuner.restore`, the study is reloaded from its SQLite file and reconciled with the
  restored searcher state, so trials that finished after the last experiment checkpoint are
  not told again (stock Ray raises `UpdateFinishedTrialError` there) and trials asked for but
  never started are closed as FAIL.
Every study trial carries the user attribute `ray_trial_id`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from .spaces import Space

log = logging.getLogger(__name__)

BASELINE_KEY = "_baseline"  # marks the seed baseline's trial config
SAMPLERS = {
    "tpe": lambda seed, startup: optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, constant_liar=True
    ),
    "random": lambda seed, startup: optuna.samplers.RandomSampler(seed=seed),
}


# study name -> the study's URL for this driver, set before a restore: the pickled searcher
# holds the URL of the driver that began the search, whose working copy may be elsewhere.
STUDY_URLS: dict[str, str] = {}


class StudySearch(OptunaSearch):
    def __init__(
        self,
        space: Space,
        *,
        metric: str,
        mode: str,
        max_epochs: int,
        storage_url: str,
        study_name: str,
        seed: int = 0,
        sampler: str = "tpe",
        num_samples: int = 10,
        baseline: dict[str, Any] | None = None,
        warm: list | None = None,
        objectives: list[str] | None = None,
    ):
        self._study_url = storage_url  # study.study_url: the folder's study.db, or --study-storage
        startup = max(2, min(10, num_samples // 3))
        # More than one objective: a multi-objective study (Optuna's TPE handles it), the
        # metric first; each measure (latency_ms, params) is better smaller.
        self._objectives = list(objectives) if objectives and len(objectives) > 1 else None
        super().__init__(
            space=space.suggest,
            metric=self._objectives or metric,
            mode=[mode] + ["min"] * (len(self._objectives) - 1) if self._objectives else mode,
            sampler=SAMPLERS[sampler](seed, startup),
            study_name=study_name,
            storage=optuna.storages.RDBStorage(self._study_url),
        )
        self._max_epochs = max_epochs
        self._baseline = {**baseline, BASELINE_KEY: True} if baseline is not None else None
        self._baseline_trial: str | None = None
        if warm:  # an earlier search's trials (warm.py): TPE starts from what they measured
            self._ot_study.add_trials(warm)

    def suggest(self, trial_id: str) -> dict | None:
        if self._baseline is not None and self._baseline_trial in (None, trial_id):
            if self._baseline_trial is None:
                self._baseline_trial = trial_id
                trial = self._ot_trials[trial_id] = self._ot_study.ask()
                trial.set_user_attr("baseline", True)
                trial.set_user_attr("config", {k: v for k, v in self._baseline.items() if k != BASELINE_KEY})
                trial.set_user_attr("ray_trial_id", trial_id)
            return dict(self._baseline)
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def _values(self, result: dict | None) -> list[float] | None:
        """The objectives' values in a result; None for a diverged or incomplete one."""
        names = self._objectives or [self.metric]
        if not result or result.get("diverged") or any(result.get(n) is None for n in names):
            return None
        return [float(result[n]) for n in names]

    def _report(self, trial_id: str, result: dict | None) -> None:
        """The result's value at its epoch (tune_age's own count, which a restored trial
        continues), once per epoch; diverged results carry no value. Optuna refuses
        intermediate values in multi-objective studies (optuna#3450): there, each epoch's
        values go to the user attribute `epoch_values` ({epoch: [value per objective]})."""
        ot_trial = self._ot_trials.get(trial_id)
        values = self._values(result)
        if ot_trial is None or values is None:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        stored = ot_trial.storage.get_trial(ot_trial._trial_id)
        if self._objectives:
            by_epoch = dict(stored.user_attrs.get("epoch_values", {}))
            if str(step) not in by_epoch:
                ot_trial.set_user_attr("epoch_values", {**by_epoch, str(step): values})
        elif step not in stored.intermediate_values:
            ot_trial.report(values[0], step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        self._report(trial_id, result)
        state, value = self._outcome(result, error)
        if result and result.get("diverged"):
            ot_trial.set_user_attr("diverged", True)
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told before the driver was restarted; the study already agrees

    def _outcome(self, result: dict | None, error: bool) -> tuple[TrialState, Any]:
        values = self._values(result)
        if error or values is None:
            return TrialState.FAIL, None
        if int(result.get("epoch", 0)) < self._max_epochs:
            return TrialState.PRUNED, None  # optuna keeps its last intermediate value
        return TrialState.COMPLETE, values if self._objectives else values[0]

    def restore(self, checkpoint_path: str) -> None:
        # The pickled study storage would connect to the URL of the driver that began the
        # search (its study.db may be on another machine): restore it unconnected, then open
        # the study where this driver keeps it (_reconcile).
        from optuna.storages import RDBStorage

        connect = RDBStorage.__setstate__
        RDBStorage.__setstate__ = lambda storage, state: storage.__dict__.update(state)
        try:
            super().restore(checkpoint_path)
        finally:
            RDBStorage.__setstate__ = connect
        self._study_url = STUDY_URLS.get(self._study_name, self._study_url)
        self._reconcile()

    def _reconcile(self) -> None:
        """Brings the restored state in line with what the study file recorded since."""
        study = optuna.load_study(
            study_name=self._study_name, storage=self._study_url, sampler=self._ot_study.sampler
        )
        self._ot_study = study
        self._storage = study._storage  # (what restore unpickled is not connected: see restore)
        stored = {t._trial_id: t for t in study.get_trials(deepcopy=False)}
        known = set()
        for ray_id, old in list(self._ot_trials.items()):
            frozen = stored.get(old._trial_id)
            known.add(old._trial_id)
            if frozen is None:
                del self._ot_trials[ray_id]
                continue
            if frozen.state.is_finished():
                self._completed_trials.add(ray_id)
            self._ot_trials[ray_id] = optuna.trial.Trial(study, old._trial_id)  # bound to this study
        for t in stored.values():
            if t.state in (TrialState.RUNNING, TrialState.WAITING) and t._trial_id not in known:
                # Asked for after the last experiment checkpoint: Ray will never run it.
                study.tell(t.number, state=TrialState.FAIL)
                log.info("closed study trial %d, which was never started before the restart", t.number)


def close_trials(storage_url: str, study_name: str, entries: list[dict]) -> None:
    """Tells the study about trials Ray stopped without telling the searcher (the time budget
    ran out while they ran): pruned at their last epoch, with every epoch they reported, or
    failed where they reported none; trials asked for that never started fail too (the
    search is over). `entries` are trial-log entries (tracking.py)."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in study.get_trials(deepcopy=False)
                 if not t.state.is_finished()}
    for entry in entries:
        frozen = by_ray_id.get(entry["trial_id"])
        if frozen is None:
            continue
        trial = optuna.trial.Trial(study, frozen._trial_id)
        for epoch, value, _ in entry.get("scores", []):
            # (a multi-objective study keeps them in `epoch_values`, already there)
            if len(study.directions) == 1 and epoch not in frozen.intermediate_values:
                trial.report(float(value), int(epoch))
        trial.set_user_attr("stopped_by", "time budget")
        study.tell(trial, state=TrialState.PRUNED if entry.get("scores") else TrialState.FAIL)
        del by_ray_id[entry["trial_id"]]
    for frozen in by_ray_id.values():
        study.tell(frozen.number, state=TrialState.FAIL)


class CountedSearch(SearchGenerator):
    """Ray's wrapper of a searcher, with the number of trials read from the experiment's own
    settings (`tune_age.json`'s `num_samples`) whenever Ray restores it, so that
    `--resume --num-samples N` grows a search: stock Ray restores the count it began with."""

    def __init__(self, searcher: StudySearch, meta_path: str | Path):
        super().__init__(searcher)
        self._meta_path = str(meta_path)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        wanted = int(json.loads(Path(self._meta_path).read_text())["num_samples"])
        if wanted > self._total_samples:
            self._total_samples = wanted
