"""Small data: folds of train+val that never touch the test split, a search that picks
cross-validation by itself on a small validation split, and intervals that say how sure a
score is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tune_age.results import load_experiment, summary_lines
from tune_age.results.export import load_model
from tune_age.results.intervals import bootstrap, paired, wilson
from tune_age.training.crossval import fold_data, stratified_folds

from conftest import SMALL_N, run_cli
from test_correctness import fake_data


def test_folds_are_disjoint_stratified_and_leave_the_test_split_alone():
    labels = np.array([0] * 23 + [1] * 11 + [2] * 3)
    folds = stratified_folds(labels, 5, seed=1)
    rows = np.concatenate(folds)
    assert sorted(rows.tolist()) == list(range(len(labels)))  # each position in exactly one fold
    for fold in folds:
        assert abs((labels[fold] == 0).sum() - 23 / 5) < 1 and abs((labels[fold] == 1).sum() - 11 / 5) < 1
    data = fake_data(80)
    pool = set(data.splits["train"]) | set(data.splits["val"])
    views = fold_data(data, 4, seed=0)
    vals = [set(v.splits["val"]) for v in views]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)
    for view in views:
        train, val, test = (set(view.splits[s]) for s in ("train", "val", "test"))
        assert not train & val and train | val == pool and test == set(data.splits["test"])


def test_intervals():
    low, high = wilson(0.5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0.0, 20)[0] == 0.0 and 0.1 < wilson(0.0, 20)[1] < 0.2
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 300)
    good = np.where(rng.random(300) < 0.7, target, (target + 1) % 3)
    bad = np.where(rng.random(300) < 0.4, target, (target + 1) % 3)
    lo, hi = bootstrap(good, target)
    assert lo < np.mean(good == target) < hi and hi - lo < 0.15
    diff, dlo, dhi = paired(good, bad, target)
    assert dlo > 0 and dlo < diff < dhi


@pytest.mark.slow
def test_a_small_validation_split_gets_cross_validation_by_itself(tmp_path):
    proc = run_cli("search", "--synthetic-n", str(SMALL_N), "--space", "quick", "--num-samples", "2",
                   "--max-epochs", "2", "--storage", str(tmp_path), "--name", "cv", "--seed", "2")
    assert "cross-validation: 5 folds of train+val per trial (the validation split holds" in proc.stdout
    exp = load_experiment(tmp_path / "cv")
    assert exp.meta["cv"]["folds"] == 5
    sizes = exp.meta["split_sizes"]
    for entry in exp.trials.values():
        rows = exp.history(entry)
        assert rows and all(r["cv_folds"] == 5 and r["val_n"] == sizes["train"] + sizes["val"] for r in rows)
        assert all(len(r["fold_val_acc"]) == 5 and r["val_acc_std"] >= 0 for r in rows)
    summary = summary_lines(exp)
    assert any(line.startswith("validation: 5-fold cross-validation") for line in summary)
    best = next(line for line in summary if line.startswith("best val_acc"))
    assert f"on {sizes['train'] + sizes['val']} images]" in best and "across 5 folds" in best
    if exp.best_trial()["trial_id"] == exp.baseline_trial()["trial_id"]:
        assert any(line.startswith("best searched trial val_acc") for line in summary)
    else:
        assert any(line.startswith("lead over the seed baseline") for line in summary)
    # The export of a cross-validated trial is a working model (its first fold's), and says so.
    proc = run_cli("export", str(tmp_path / "cv"), "--out", str(tmp_path / "best.pt"))
    assert "cross-validated 5 folds; this is its first fold's model" in proc.stdout
    assert load_model(tmp_path / "best.pt").kind == "export"
    # --refit: the configuration retrained on train+val, scored once on the test split.
    proc = run_cli("export", str(tmp_path / "cv"), "--out", str(tmp_path / "refit.pt"), "--refit")
    pooled = sizes["train"] + sizes["val"]
    assert f"retrained on train+val ({pooled} images)" in proc.stdout
    assert f"test split ({sizes['test']} images, scored once)" in proc.stdout
    refit = load_model(tmp_path / "refit.pt")
    assert refit.provenance["refit"]["images"] == pooled and len(refit.seen) <= pooled
    faces = load_experiment(tmp_path / "cv").meta["data_source"]
    assert "synthetic" in faces
    meta = json.loads((tmp_path / "cv" / "tune_age.json").read_text())
    assert meta["cv"]["why"].startswith("the validation split holds")
