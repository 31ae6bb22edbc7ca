"""What a resumed, grown or budget-stopped search tells the user and the study; the driver
lock; ASHA's rungs after a restart. One Ray instance for the module, searches in-process."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from tune_age.cli import main
from tune_age.config import DataConfig, SearchConfig
from tune_age.results import load_experiment
from tune_age.search import BaselineFullBudgetASHA, run_search
from tune_age.search.lock import LOCK_FILE, DriverLock, driver_alive
from tune_age.search.tracking import write_json_atomic

from conftest import SMALL_N

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def study_of(exp):
    return optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp.study_path}")


def test_resume_grows_a_finished_search_and_refuses_other_changes(local_ray, tmp_path, capsys):
    args = ["search", "--synthetic-n", str(SMALL_N), "--space", "quick", "--max-epochs", "2",
            "--storage", str(tmp_path), "--name", "grow", "--cv", "1", "--no-baseline"]
    assert main([*args, "--num-samples", "3"]) == 0
    exp = load_experiment(tmp_path / "grow")
    first = {k: v["best"] for k, v in exp.trials.items()}
    assert len(first) == 3 and exp.finished()
    capsys.readouterr()

    # Options that would change the search are refused, naming the option and its value.
    resume = ["search", "--storage", str(tmp_path), "--name", "grow", "--resume"]
    for extra, says in (
        (["--max-epochs", "5"], "--max-epochs 5: 'grow' was started with --max-epochs 2"),
        (["--space", "default"], "--space default: 'grow' was started with --space quick"),
        (["--space", "quick", "--synthetic-n", "500"], f"--synthetic-n 500: 'grow' was started with --synthetic-n {SMALL_N}"),
        (["--data", str(tmp_path)], "--data"),
        (["--num-samples", "2"], "--num-samples 2: 'grow' already has 3 trials"),
        (["--seed", "0", "--searcher", "random"], "--searcher random: 'grow' was started with --searcher tpe"),
    ):
        assert main([*resume, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (extra, err)
    assert json.loads((tmp_path / "grow" / "tune_age.json").read_text())["num_samples"] == 3

    # A larger --num-samples continues sampling in the same study.
    assert main([*resume, "--num-samples", "5"]) == 0
    exp = load_experiment(tmp_path / "grow")
    assert len(exp.trials) == 5 and exp.meta["num_samples"] == 5
    assert all(exp.trials[k]["best"] == v for k, v in first.items())  # the first three not rerun
    study = study_of(exp)
    assert len(study.trials) == 5 and all(t.state.is_finished() for t in study.trials)
    assert "5 trials" in capsys.readouterr().out


def test_time_budget_stops_trials_tells_the_study_and_survives_resume(local_ray, tmp_path, capsys):
    search = SearchConfig(space="quick", num_samples=40, max_epochs=3, storage=str(tmp_path),
                          name="budget", time_budget_min=0.4, cv=1, scheduler="fifo")
    run_search(search, DataConfig(synthetic_n=SMALL_N), progress=False)
    exp = load_experiment(tmp_path / "budget")
    statuses = [t["status"] for t in exp.trials.values()]
    assert "stopped" in statuses and len(statuses) < 40, statuses
    assert exp.meta["time_used_s"] >= 0.4 * 60 - 10
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study_of(exp).trials}
    assert all(t.state.is_finished() for t in by_ray_id.values())
    for trial_id, entry in exp.trials.items():
        if entry["status"] == "stopped":
            frozen = by_ray_id[trial_id]
            assert frozen.state in (TrialState.PRUNED, TrialState.FAIL)
            assert frozen.intermediate_values == {e: pytest.approx(v) for e, v, _ in entry["scores"]}

    # The budget is spent: a resume says so and ends as finished (exit 0), not interrupted.
    capsys.readouterr()
    assert main(["search", "--storage", str(tmp_path), "--name", "budget", "--resume"]) == 0
    assert "time budget of 0.4 min used up" in capsys.readouterr().out
    assert len(load_experiment(tmp_path / "budget").trials) == len(statuses)


def test_a_second_driver_is_refused_and_a_dead_drivers_lock_taken_over(tmp_path, capsys):
    exp = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from tune_age.search.lock import DriverLock\n"
        f"with DriverLock({str(exp)!r}):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert driver_alive(exp)
        (exp / "tune_age.json").write_text("{}")
        code = main(["search", "--storage", str(tmp_path), "--name", "locked", "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"'locked' is being run by another driver (pid {holder.pid} on" in err[0]
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock file stays, but no one holds it.
    assert (exp / LOCK_FILE).is_file() and not driver_alive(exp)
    with DriverLock(exp) as lock:
        assert lock.took_over and f"pid {holder.pid}" in lock.took_over
        assert driver_alive(exp)
    assert not (exp / LOCK_FILE).exists() and not driver_alive(exp)


def test_running_trials_of_a_dead_driver_read_as_interrupted(tmp_path):
    exp = tmp_path / "dead"
    exp.mkdir()
    (exp / "tune_age.json").write_text(json.dumps({"name": "dead", "metric": "val_acc", "mode": "max",
                                                   "num_samples": 2}))
    entry = {"trial_id": "a", "status": "running", "config": {}, "epochs": 1, "best": 0.3, "scores": []}
    write_json_atomic(exp / "trials.jsonl", {"a": entry})
    (exp / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    old = time.time() - 120
    import os

    os.utime(exp / LOCK_FILE, (old, old))  # another host's driver, silent for two minutes
    loaded = load_experiment(exp)
    assert loaded.trials["a"]["status"] == "interrupted" and loaded.finished()
    os.utime(exp / LOCK_FILE)  # its heartbeat is fresh: it runs
    loaded = load_experiment(exp)
    assert loaded.trials["a"]["status"] == "running" and not loaded.finished()


def test_asha_after_a_restart_stops_a_trial_below_a_rung_it_had_already_set(tmp_path):
    """Ray unpickles the scheduler as it was built; the rungs come back from the trial log."""

    class Trial:
        def __init__(self, trial_id):
            self.trial_id, self.config = trial_id, {}

    log = tmp_path / "trials.jsonl"
    scheduler = BaselineFullBudgetASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=9,
                                       grace_period=1, reduction_factor=3, trial_log=log)
    restarted = pickle.loads(pickle.dumps(scheduler))
    # Before the restart, three trials passed epoch 3 (a rung) with these values.
    write_json_atomic(log, {t: {"trial_id": t, "scores": [[1, v, v], [2, v, v], [3, v, v]]}
                            for t, v in (("a", 0.5), ("b", 0.6), ("c", 0.7))})
    slow = Trial("d")
    restarted.on_trial_add(None, slow)
    assert restarted.on_trial_result(None, slow, {"epoch": 3, "val_acc": 0.55}) == "STOP"
    # Without the rebuilt rungs, the first trial at the rung would have gone on.
    fresh = BaselineFullBudgetASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=9,
                                   grace_period=1, reduction_factor=3)
    fresh.on_trial_add(None, slow)
    assert fresh.on_trial_result(None, slow, {"epoch": 3, "val_acc": 0.55}) == "CONTINUE"
