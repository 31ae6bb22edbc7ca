"""What a resumed, grown or budget-stopped search tells the user and the study; the driver
lock; ASHA's rungs after a restart. One Ray instance for the module, searches in-process."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

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
    # Trials of 30 epochs: one is running when the 24 s run out, however loaded the machine.
    search = SearchConfig(space="quick", num_samples=40, max_epochs=30, storage=str(tmp_path),
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


def test_warm_start_seeds_the_study_with_the_trials_that_fit(local_ray, tmp_path, capsys):
    common = ["search", "--synthetic-n", str(SMALL_N), "--storage", str(tmp_path), "--cv", "1",
              "--max-epochs", "2", "--space", "quick"]
    assert main([*common, "--name", "a", "--num-samples", "4"]) == 0
    old = study_of(load_experiment(tmp_path / "a"))
    searched = [t for t in old.trials if not t.user_attrs.get("baseline")]
    capsys.readouterr()

    assert main([*common, "--name", "b", "--num-samples", "2", "--warm-start", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"warm start: {len(searched)} trial(s) from {tmp_path / 'a'} (left out: 1 the seed baseline)" in out
    exp = load_experiment(tmp_path / "b")
    assert len(exp.trials) == 2 and exp.meta["warm_start"]["trials"] == len(searched)
    study = study_of(exp)
    warm = [t for t in study.trials if "warm_start_from" in t.user_attrs]
    assert len(warm) == len(searched)
    by_id = {t.user_attrs["ray_trial_id"]: t for t in searched}
    for t in warm:  # what the earlier trials measured, at the same epochs, in the same state
        before = by_id[t.user_attrs["warm_start_trial"]]
        assert t.params == before.params and t.intermediate_values == before.intermediate_values
        assert t.state == before.state and t.value == before.value
    assert len(study.trials) == len(warm) + 2  # its own two: the seed baseline and one trial

    # A space that cannot have produced them takes none, and says why.
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text((Path(__file__).parents[1] / "search_spaces" / "quick.yaml").read_text()
                      .replace("lr: {loguniform: [1.0e-3, 1.0e-2]}", "lr: {loguniform: [0.5, 1.0]}"))
    assert main([*common[:-1], str(narrow), "--name", "c", "--num-samples", "1", "--no-baseline",
                 "--warm-start", str(tmp_path / "a")]) == 0
    assert f"warm start: 0 trial(s) from {tmp_path / 'a'} (left out: {len(searched)} values outside the new space; 1 the seed baseline)" in capsys.readouterr().out
    assert main([*common, "--name", "d", "--warm-start", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--warm-start {tmp_path}: not a tune_age search folder" in err[0]


def test_accuracy_against_latency_search_front_and_pick(local_ray, tmp_path, capsys):
    assert main(["search", "--synthetic-n", str(SMALL_N), "--space", "quick", "--max-epochs", "2",
                 "--num-samples", "4", "--storage", str(tmp_path), "--name", "fast", "--cv", "1",
                 "--objectives", "val_acc,latency_ms"]) == 0
    out = capsys.readouterr().out
    exp = load_experiment(tmp_path / "fast")
    assert exp.meta["objectives"] == ["val_acc", "latency_ms"] and "Pareto front (val_acc against latency_ms" in out
    study = study_of(exp)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for trial_id, entry in exp.trials.items():
        last = entry["last"]
        assert last["latency_ms"] > 0 and last["latency64_ms"] > last["latency_ms"] and last["params"] > 0
        rows = [json.loads(x) for x in (exp.trial_dir(entry) / "result.json").read_text().splitlines() if x]
        frozen = by_ray_id[trial_id]
        # Optuna refuses intermediate values here: each epoch's are a user attribute, all of them.
        assert frozen.user_attrs["epoch_values"] == {
            str(r["epoch"]): [pytest.approx(r["val_acc"]), pytest.approx(r["latency_ms"])] for r in rows}
        if frozen.state == TrialState.COMPLETE:
            assert frozen.values == [pytest.approx(rows[-1]["val_acc"]), pytest.approx(rows[-1]["latency_ms"])]

    from tune_age.results import pareto_front

    front = pareto_front(exp)
    assert front
    for a in front:  # no trial beats a front trial on both
        for b in exp.trials.values():
            assert not (b["best"] > a["best"] and b["last"]["latency_ms"] < a["last"]["latency_ms"])

    fastest = min(exp.trials.values(), key=lambda e: e["last"]["latency_ms"])
    limit = fastest["last"]["latency_ms"]
    assert main(["export", str(tmp_path / "fast"), "--pick", f"latency_ms<={limit}",
                 "--out", str(tmp_path / "fast.pt")]) == 0
    assert f"trial {fastest['trial_id']}" in capsys.readouterr().out
    provenance = torch_load(tmp_path / "fast.pt")["provenance"]
    assert provenance["trial_id"] == fastest["trial_id"] and provenance["selected_by"]["pick"] == f"latency_ms<={limit}"
    assert main(["export", str(tmp_path / "fast"), "--pick", "latency_ms<=0", "--out", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pick 'latency_ms<=0': no trial qualifies; the closest is trial" in err[0]
    assert not (tmp_path / "none.pt").exists()

    assert main(["report", str(tmp_path / "fast"), "--no-eval"]) == 0
    report = (tmp_path / "fast" / "report" / "report.md").read_text()
    assert "## Accuracy against latency_ms" in report and (tmp_path / "fast" / "report" / "pareto.png").is_file()


def torch_load(path):
    import torch

    return torch.load(path, weights_only=False)
