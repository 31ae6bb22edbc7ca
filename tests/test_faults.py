"""Failing trials: crashes are retried from their checkpoint, diverging trials end as `diverged`."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tune_age.search.tracking import read_trials

from conftest import SMALL_N, run_cli

pytestmark = pytest.mark.slow

# SGD at lr 10 with momentum 0.99 and no batch-norm blows up within two epochs.
RISKY_SPACE = """\
search: {num_samples: 6, max_epochs: 3}
params:
  image_size: 32
  conv_layers: 2
  channels: 16
  batch_norm: false
  optimizer: sgd
  momentum: 0.99
  weight_decay: 0.0
  lr: {choice: [0.003, 10.0]}
"""


def test_crashes_are_retried_and_divergence_ends_only_that_trial(tmp_path, monkeypatch):
    space = tmp_path / "risky.yaml"
    space.write_text(RISKY_SPACE)
    monkeypatch.setenv("TUNE_AGE_TEST_CRASH", f"2:{tmp_path / 'crashed'}")
    proc = run_cli("search", "--space", str(space), "--synthetic-n", str(SMALL_N), "--storage", str(tmp_path),
                   "--name", "risky", "--searcher", "random", "--seed", "4", "--scheduler", "fifo",
                   "--no-baseline", "--max-failures", "2", "--cv", "1")
    trials = read_trials(tmp_path / "risky" / "trials.jsonl")
    assert len(trials) == 6
    by_lr = {lr: [t for t in trials.values() if t["config"]["lr"] == lr] for lr in (0.003, 10.0)}
    assert by_lr[0.003] and by_lr[10.0], "the seed should draw both learning rates"

    for t in by_lr[10.0]:
        assert t["status"] == "diverged", t
        assert "diverged" in t["last"]["error"]
        assert f"trial {t['trial_id']} diverged" in proc.stdout
    for t in by_lr[0.003]:
        # Each crashed once at epoch 2, was retried from its epoch-1 checkpoint and finished.
        assert t["status"] == "completed" and t["epochs"] == 3, t
        assert t["attempts"] == 2 and "injected crash at epoch 2" in t["errors"][0]
        assert f"trial {t['trial_id']} completed after 2 attempt(s): " in proc.stdout

    study = optuna.load_study(study_name="risky", storage=f"sqlite:///{tmp_path / 'risky' / 'study.db'}")
    states = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    for t in by_lr[10.0]:
        assert states[t["trial_id"]].state == optuna.trial.TrialState.FAIL
        assert states[t["trial_id"]].user_attrs.get("diverged") is True
    for t in by_lr[0.003]:
        assert states[t["trial_id"]].state == optuna.trial.TrialState.COMPLETE


def test_two_searches_at_once_on_one_storage_do_not_interfere(tmp_path):
    import os
    import subprocess
    import sys

    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tune_age", "search", "--synthetic-n", str(SMALL_N), "--num-samples", "3",
             "--max-epochs", "2", "--storage", str(tmp_path), "--name", name, "--seed", str(seed),
             "--no-baseline", "--cv", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
        )
        for seed, name in enumerate(("left", "right"))
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    for name in procs:
        exp = tmp_path / name
        trials = read_trials(exp / "trials.jsonl")
        assert len(trials) == 3
        assert {p.name for p in exp.glob("trial_*")} == {t["dir"] for t in trials.values()}
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'study.db'}")
        assert {t.user_attrs["ray_trial_id"] for t in study.get_trials()} == set(trials)
    assert not set(read_trials(tmp_path / "left" / "trials.jsonl")) & set(read_trials(tmp_path / "right" / "trials.jsonl"))


def test_a_search_whose_every_trial_fails_exits_non_zero_naming_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_AGE_TEST_CRASH", f"1:{tmp_path / 'crashed'}")
    proc = run_cli("search", "--space", "quick", "--synthetic-n", str(SMALL_N), "--storage", str(tmp_path),
                   "--name", "broken", "--num-samples", "2", "--max-epochs", "1", "--no-baseline",
                   "--max-failures", "0", "--cv", "1", check=False)
    trials = read_trials(tmp_path / "broken" / "trials.jsonl")
    assert [t["status"] for t in trials.values()] == ["errored", "errored"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("tune-age: error:")]
    assert len(error) == 1 and "every trial that ran failed (2 errored)" in error[0], proc.stderr
    assert "injected crash at epoch 1" in error[0] and "Traceback" not in proc.stderr
    traceback = Path(error[0].split("(traceback: ")[1].rstrip(")"))
    assert traceback.parent.parent == tmp_path / "broken" and "injected crash" in traceback.read_text()
    assert "no trial finished with a score" in proc.stdout and "tune-age export" not in proc.stdout
