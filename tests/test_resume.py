"""Interrupted searches: Ctrl-C and SIGKILL of the driver, then --resume to completion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tune_age.cli import main
from tune_age.results import load_experiment
from tune_age.search.tracking import FINAL, read_trials

from conftest import SMALL_N, run_cli

pytestmark = pytest.mark.slow
NUM_SAMPLES = 6
STATE_OF = {
    "completed": optuna.trial.TrialState.COMPLETE,
    "early-stopped": optuna.trial.TrialState.PRUNED,
    "diverged": optuna.trial.TrialState.FAIL,
    "errored": optuna.trial.TrialState.FAIL,
}


def start_search(storage: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = ["--storage", str(storage), "--name", "resumable"]
    if not extra:
        args = ["--synthetic-n", str(SMALL_N), "--num-samples", str(NUM_SAMPLES), "--max-epochs", "3",
                "--seed", "3", "--cv", "1", *args]
    return subprocess.Popen(
        [sys.executable, "-m", "tune_age", "search", *args, *extra],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ),
    )


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"search exited early with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting for the search")


def finished(exp: Path) -> dict:
    return {k: v for k, v in read_trials(exp / "trials.jsonl").items() if v["status"] in FINAL}


def epochs_logged(exp: Path, entry: dict) -> list:
    lines = (exp / entry["dir"] / "result.json").read_text().splitlines()
    return [json.loads(x)["epoch"] for x in lines if x.strip()]


def test_ctrl_c_then_sigkill_then_resume_completes_without_rerunning(tmp_path):
    exp = tmp_path / "resumable"
    log = tmp_path / "search.log"

    # Ctrl-C: stops within seconds, prints the exact resume command, exits 130.
    proc = start_search(tmp_path, log)
    wait_for(lambda: "epoch 1/3" in log.read_text(), 240, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    assert f"tune-age search --name resumable --storage {tmp_path} --resume" in log.read_text()
    statuses = {t["status"] for t in read_trials(exp / "trials.jsonl").values()}
    assert "interrupted" in statuses and not statuses & {"running", "pending"}, statuses

    # SIGKILL of the resumed driver once it has finished two more trials.
    before = len(finished(exp))
    proc = start_search(tmp_path, log, "--resume")
    wait_for(lambda: len(finished(exp)) >= before + 2, 300, proc)
    time.sleep(3)  # Ray saves its experiment state every 2 s
    done_before_kill = finished(exp)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Nothing runs now: the trials it was running read as interrupted, not running.
    statuses = {t["status"] for t in load_experiment(exp).trials.values()}
    assert not statuses & {"running", "pending", "retrying"}, statuses

    proc = run_cli("search", "--storage", str(tmp_path), "--name", "resumable", "--resume")
    assert f"trials: {NUM_SAMPLES}" in proc.stdout or "lost" in proc.stdout, proc.stdout

    trials = read_trials(exp / "trials.jsonl")
    kept = {k: v for k, v in trials.items() if v["status"] != "lost"}
    assert len(kept) == NUM_SAMPLES
    assert all(v["status"] in FINAL for v in kept.values()), [v["status"] for v in kept.values()]
    for trial_id, entry in done_before_kill.items():  # no finished trial trained again
        assert trials[trial_id]["epochs"] == entry["epochs"]
        assert trials[trial_id]["best"] == entry["best"]
    # Every epoch of every trial once, where tune_age reads them: the trial log, and each
    # trial's history. (Ray's own result.json can hold an epoch twice: results in flight when
    # the driver stops, or reported after its last saved state, are trained again by the
    # restored trial and appended; history keeps the later report.)
    final = load_experiment(exp)
    for trial_id, entry in kept.items():
        epochs = list(range(1, entry["epochs"] + 1))
        if entry["status"] != "diverged":  # (a diverged epoch has no score)
            assert [s[0] for s in entry["scores"]] == epochs, entry
        assert [r["epoch"] for r in final.history(final.trials[trial_id])] == epochs
        assert sorted(set(epochs_logged(exp, entry))) == epochs

    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{exp / 'study.db'}")
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials() if "ray_trial_id" in t.user_attrs}
    assert all(t.state.is_finished() for t in study.get_trials())
    for trial_id, entry in kept.items():
        assert by_ray_id[trial_id].state == STATE_OF[entry["status"]], (trial_id, entry["status"])


def test_existing_experiment_is_never_overwritten(tmp_path, capsys):
    exp = tmp_path / "taken"
    exp.mkdir()
    (exp / "keep.txt").write_text("precious")
    assert main(["search", "--storage", str(tmp_path), "--name", "taken"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tune-age: error: experiment 'taken' already exists in {tmp_path}; add --resume to continue it "
        "or choose another --name (tune_age never overwrites a search)"
    ]
    assert (exp / "keep.txt").read_text() == "precious"
    assert main(["search", "--storage", str(tmp_path), "--name", "missing", "--resume"]) == 2
    assert "cannot resume 'missing'" in capsys.readouterr().err
