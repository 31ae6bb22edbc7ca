"""StudySearch through suggest and on_trial_complete alone, without starting Ray."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from tune_age.search.searcher import BASELINE_KEY, StudySearch
from tune_age.search.spaces import load_space, seed_baseline


def test_baseline_first_then_space_and_outcomes_recorded_right(tmp_path):
    search = StudySearch(load_space("quick"), metric="val_acc", mode="max", max_epochs=3,
                         storage_url=f"sqlite:///{tmp_path / 'study.db'}", study_name="s", seed=0, num_samples=4,
                         baseline=seed_baseline().to_dict())
    first = search.suggest("t0")
    assert first[BASELINE_KEY] is True and first["batch_size"] == 35 and first["head"] == "flatten"
    configs = {tid: search.suggest(tid) for tid in ("t1", "t2", "t3")}
    assert all(BASELINE_KEY not in c and c["image_size"] in (32, 48) for c in configs.values())

    for epoch, value in ((1, 0.2), (2, 0.3)):
        search.on_trial_result("t0", {"val_acc": value, "epoch": epoch})
    search.on_trial_complete("t0", {"val_acc": 0.33, "epoch": 3})
    search.on_trial_result("t1", {"val_acc": 0.25, "epoch": 1, "training_iteration": 1})
    search.on_trial_complete("t1", {"val_acc": 0.30, "epoch": 2})          # ASHA stopped it on this one
    search.on_trial_complete("t2", {"val_acc": 0.45, "epoch": 3})          # full budget
    search.on_trial_complete("t3", {"val_acc": 0.0, "epoch": 2, "diverged": True})
    search.on_trial_complete("t2", {"val_acc": 0.99, "epoch": 3})          # told twice: ignored

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    baseline = by_id["t0"]
    assert baseline.state == TrialState.COMPLETE and baseline.user_attrs["baseline"] is True
    assert baseline.params == {} and baseline.user_attrs["config"]["batch_size"] == 35
    assert baseline.intermediate_values == {1: 0.2, 2: 0.3, 3: 0.33}
    assert baseline.datetime_start < baseline.datetime_complete
    # The result the scheduler stopped it on is its last intermediate value.
    assert by_id["t1"].state == TrialState.PRUNED and by_id["t1"].intermediate_values == {1: 0.25, 2: 0.30}
    assert by_id["t2"].intermediate_values == {3: 0.45}
    assert by_id["t2"].state == TrialState.COMPLETE and by_id["t2"].value == 0.45
    assert by_id["t3"].state == TrialState.FAIL and by_id["t3"].user_attrs["diverged"] is True
