"""Searches end to end: results, checkpoints and the Optuna study; GPU packing on fake GPUs."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import torch

from tune_age.config import DataConfig, SearchConfig
from tune_age.errors import ConfigError
from tune_age.results import load_experiment
from tune_age.search import plan_resources, run_search
from tune_age.search.tracking import read_trials

from conftest import SMALL_N, free_port

pytestmark = pytest.mark.slow
STATE_OF = {
    "completed": optuna.trial.TrialState.COMPLETE,
    "early-stopped": optuna.trial.TrialState.PRUNED,
    "diverged": optuna.trial.TrialState.FAIL,
}


def result_lines(trial_dir):
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def test_small_search_results_checkpoints_and_study_agree(small_search):
    exp = load_experiment(small_search)
    assert len(exp.trials) == 4
    baselines = [t for t in exp.trials.values() if t["config"].get("_baseline")]
    assert len(baselines) == 1  # that it is suggested first is checked in test_searcher.py
    assert baselines[0]["config"]["batch_size"] == 35 and baselines[0]["config"]["image_size"] == "native"
    assert baselines[0]["status"] == "completed"  # ASHA never stops it early

    study = optuna.load_study(study_name="small", storage=f"sqlite:///{exp.study_path}")
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert set(by_ray_id) == set(exp.trials)
    for entry in exp.trials.values():
        assert entry["status"] in STATE_OF, entry
        frozen = by_ray_id[entry["trial_id"]]
        assert frozen.state == STATE_OF[entry["status"]], (entry["status"], frozen.state)
        lines = result_lines(exp.trial_dir(entry))
        assert [r["epoch"] for r in lines] == list(range(1, entry["epochs"] + 1))
        # The study holds what the trial measured, every epoch, the one ASHA stopped it on too.
        measured = {r["epoch"]: pytest.approx(r["val_acc"]) for r in lines}
        assert frozen.intermediate_values == measured, entry["trial_id"]
        assert {e: pytest.approx(v) for e, v, _ in entry["scores"]} == frozen.intermediate_values
        assert frozen.datetime_start < frozen.datetime_complete
        if entry["status"] == "completed":
            assert entry["epochs"] == 3
            assert frozen.value == pytest.approx(lines[-1]["val_acc"])
        else:
            assert entry["epochs"] < 3
        # Every kept checkpoint loads safely and matches the result reported at its epoch.
        checkpoints = sorted(exp.trial_dir(entry).glob("checkpoint_*/checkpoint.pt"))
        assert checkpoints
        for path in checkpoints:
            state = torch.load(path, weights_only=True)
            assert state["config"]["batch_size"] == entry["config"]["batch_size"]
            assert state["metrics"]["val_acc"] == pytest.approx(lines[state["epoch"] - 1]["val_acc"])
    baseline = by_ray_id[baselines[0]["trial_id"]]
    assert baseline.user_attrs.get("baseline") is True and baseline.params == {}
    assert baseline.user_attrs["config"] == {k: v for k, v in baselines[0]["config"].items() if k != "_baseline"}
    assert "early-stopped" in {e["status"] for e in exp.trials.values()}  # ASHA stopped one: the case that matters
    assert (small_search / "split.csv").is_file()
    meta = json.loads((small_search / "tune_age.json").read_text())
    assert meta["num_samples"] == 4 and meta["max_epochs"] == 3 and meta["space"]["name"] == "quick"


def test_resources_are_checked_against_the_cluster():
    assert plan_resources(SearchConfig(), {"CPU": 2}) == (1.0, 0.0)
    assert plan_resources(SearchConfig(), {"CPU": 16, "GPU": 2}) == (8.0, 1.0)
    assert plan_resources(SearchConfig(gpus_per_trial=0.5), {"CPU": 16, "GPU": 2}) == (4.0, 0.5)
    with pytest.raises(ConfigError, match=r"--gpus-per-trial 3 asks for more GPUs than the 2 Ray sees"):
        plan_resources(SearchConfig(gpus_per_trial=3), {"CPU": 16, "GPU": 2})
    with pytest.raises(ConfigError, match=r"than the 0 Ray sees; use at most 0 \(or leave it out"):
        plan_resources(SearchConfig(gpus_per_trial=1), {"CPU": 2})


@pytest.fixture(scope="module")
def fake_gpu_ray():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_fractional_gpus_pack_four_trials_on_two_fake_gpus(fake_gpu_ray, tmp_path):
    search = SearchConfig(
        space="quick", num_samples=4, max_epochs=2, gpus_per_trial=0.5, cpus_per_trial=1,
        storage=str(tmp_path), name="gpus", baseline_first=False, cv=1,
    )
    exp = load_experiment(run_search(search, DataConfig(synthetic_n=SMALL_N), progress=False))
    trials = list(exp.trials.values())
    assert len(trials) == 4
    gpu_ids = [t["last"]["gpu_ids"] for t in trials]
    assert all(len(ids) == 1 for ids in gpu_ids)
    # Two trials per GPU: each GPU id is held by exactly two of the four trials.
    assert sorted(ids[0] for ids in gpu_ids) == ["0", "0", "1", "1"]
    # CUDA is absent here, so every trial fell back to the CPU.
    assert {t["last"]["device"] for t in trials} == {"cpu"} and not torch.cuda.is_available()
    # All four ran at once: some moment lies inside every trial's run.
    assert max(t["started"] for t in trials) < min(t["ended"] for t in trials)


def test_local_ray_gives_trial_workers_their_environment_and_prestarts_none(tmp_path):
    # In a child process: this module's fake-GPU Ray must not be the one under test.
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, subprocess, ray\n"
        "from tune_age.search import start_ray\n"
        "start_ray(None)\n"
        # Tune's trial actors carry a runtime_env of their own (PL_DISABLE_FORK); ours must merge.
        "@ray.remote(runtime_env={'env_vars': {'PL_DISABLE_FORK': '1'}})\n"
        "class Trial:\n"
        "    def env(self):\n"
        "        return open('/proc/self/environ', 'rb').read().decode().split('\\0')\n"
        "env = ray.get(Trial.remote().env.remote())\n"
        # Idle workers of this Ray only: descendants of this process (another Ray may be running).
        "ps = subprocess.run(['ps', '-eo', 'pid=,ppid=,args='], capture_output=True, text=True).stdout\n"
        "rows = [line.split(None, 2) + [''] for line in ps.splitlines()]\n"
        "ours, grew = {str(os.getpid())}, True\n"
        "while grew:\n"
        "    new = {r[0] for r in rows if r[1] in ours} - ours\n"
        "    ours, grew = ours | new, bool(new)\n"
        "idle = sum(r[0] in ours and r[2].startswith('ray::IDLE') for r in rows)\n"
        "print(json.dumps({'env': env, 'idle': idle, 'ours': len(ours)}))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    # glibc reads MALLOC_ARENA_MAX when the process starts: it must be in the exec environment.
    assert "MALLOC_ARENA_MAX=1" in probe["env"] and "PL_DISABLE_FORK=1" in probe["env"]
    assert probe["ours"] > 3 and probe["idle"] == 0  # Ray's processes found, no idle worker among them


def test_ray_starts_while_the_data_loads_and_the_driver_keeps_no_copy(tmp_path):
    # In a child process, as above: first images that only decoding finds broken (the search
    # stops Ray again), then a real one-trial search.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("20_0_0_x.jpg", "35_1_2_y.jpg", "50_1_0_z.jpg"):
        (broken / name).write_bytes(b"not an image")
    space = tmp_path / "space.yaml"
    space.write_text("params: {image_size: 32, conv_layers: 2, channels: 8}\n")
    script = tmp_path / "probe.py"
    script.write_text(
        "import gc, json, os, subprocess, threading, time, ray\n"
        "from ray import tune\n"
        "import tune_age.search as S\n"
        "from tune_age.config import DataConfig, SearchConfig\n"
        "from tune_age.data import FaceData\n"
        "from tune_age.errors import DataError\n"
        "seen, start, load, fit = {'runs': []}, S.start_ray, S.load_data, tune.Tuner.fit\n"
        "def start_ray(*a, **k):\n"
        "    seen['ray_in_main'] = threading.current_thread() is threading.main_thread()\n"
        "    start(*a, **k)\n"
        "    seen['runs'][-1]['ray_up'] = time.time()\n"
        "def load_data(*a, **k):\n"
        "    seen['load_in_main'] = threading.current_thread() is threading.main_thread()\n"
        "    seen['runs'][-1]['load_began'] = time.time()\n"
        "    return load(*a, **k)\n"
        "def tuner_fit(self):\n"
        "    gc.collect()\n"
        "    seen['driver_face_data'] = sum(isinstance(o, FaceData) for o in gc.get_objects())\n"
        "    return fit(self)\n"
        "S.start_ray, S.load_data, tune.Tuner.fit = start_ray, load_data, tuner_fit\n"
        "def search(name, data):\n"
        "    seen['runs'].append({})\n"
        f"    S.run_search(SearchConfig(space={str(space)!r}, num_samples=1, max_epochs=1, scheduler='fifo',\n"
        f"                              baseline_first=False, storage={str(tmp_path)!r}, name=name),\n"
        "                 data, progress=False)\n"
        "try:\n"
        f"    search('bad', DataConfig(path={str(broken)!r}))\n"
        "except DataError as exc:\n"
        "    seen['error'] = str(exc)\n"
        "seen['ray_after'] = ray.is_initialized()\n"
        "ps = subprocess.run(['ps', '-o', 'args=', '--ppid', str(os.getpid())], capture_output=True, text=True)\n"
        "seen['ray_processes_after'] = [a for a in ps.stdout.splitlines() if 'raylet' in a or 'gcs_server' in a]\n"
        f"search('good', DataConfig(synthetic_n={SMALL_N}))\n"
        "print(json.dumps(seen))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["ray_in_main"] and not seen["load_in_main"]  # ray.init stays in the main thread
    assert all(run["load_began"] < run["ray_up"] for run in seen["runs"])  # data loading while Ray starts
    assert "none of the 3 images could be decoded" in seen.get("error", ""), seen
    # Bad data stopped the search before it began: Ray is stopped as if it had never started.
    assert seen["ray_after"] is False and seen["ray_processes_after"] == []
    # The good search ran, and its driver dropped the data once they were in the object store.
    assert seen["driver_face_data"] == 0
    assert read_trials(tmp_path / "good" / "trials.jsonl")


def test_optuna_dashboard_shows_every_trial_with_its_curve(small_search):
    """A real optuna-dashboard server on the search's study.db: every trial, the seed baseline
    included, with its epochs as a curve and its real start and end."""
    import time
    import urllib.request

    port = free_port()
    serve = "import sys; from optuna_dashboard._cli import main; sys.exit(main())"  # its console script
    server = subprocess.Popen([sys.executable, "-c", serve, f"sqlite:///{small_search / 'study.db'}",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return json.load(r)

        for _ in range(60):
            try:
                studies = get("/api/studies")["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("optuna-dashboard did not answer within 30 s")
        study = get(f"/api/studies/{studies[0]['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    log = read_trials(small_search / "trials.jsonl")
    assert len(study["trials"]) == len(log)
    for t in study["trials"]:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        entry = log[attrs["ray_trial_id"]]
        curve = {v["step"]: v["value"] for v in t["intermediate_values"]}
        assert curve == {e: pytest.approx(v) for e, v, _ in entry["scores"]}, entry["trial_id"]
        assert t["datetime_start"] < t["datetime_complete"]
    baseline = [t for t in study["trials"] if any(a["key"] == "baseline" for a in t["user_attrs"])]
    assert len(baseline) == 1 and baseline[0]["state"] == "Complete" and baseline[0]["intermediate_values"]


def test_every_trial_writes_tensorboard_events_of_its_epochs(small_search):
    """Ray's TensorBoard logger (tensorboardX comes with ray[tune]): `tensorboard --logdir EXP`
    shows each trial's val_acc at each epoch, as result.json has it."""
    import struct

    from tensorboardX.proto import event_pb2

    from tune_age.search.tracking import read_trials

    for entry in read_trials(small_search / "trials.jsonl").values():
        folder = small_search / entry["dir"]
        files = list(folder.glob("events.out.tfevents.*"))
        assert len(files) == 1, folder
        data, i, curve = files[0].read_bytes(), 0, {}
        while i < len(data):  # TFRecord: length (8 bytes), its CRC (4), the event, its CRC (4)
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 16 + n
            curve.update({event.step: v.simple_value for v in event.summary.value if v.tag == "ray/tune/val_acc"})
        assert curve == {r["epoch"]: pytest.approx(r["val_acc"]) for r in result_lines(folder)}



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with a SQLite backend and a local
    artifact store, in a temporary folder."""
    import time
    import urllib.request

    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    serve = "import sys; from mlflow.cli import cli; sys.exit(cli())"  # its console script
    server = subprocess.Popen([sys.executable, "-c", serve, "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"))
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            raise AssertionError("the MLflow server did not answer within 120 s")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_mlflow_logs_each_trial_as_a_run_with_its_epochs_and_best_checkpoint(mlflow_server, tmp_path, capsys):
    import hashlib

    import mlflow

    from tune_age.cli import main
    from tune_age.results.export import best_of, trial_checkpoints
    from tune_age.search.tracking import read_trials

    # A server that is not there: one line, before anything is written.
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["search", "--synthetic-n", str(SMALL_N), "--storage", str(tmp_path), "--name", "none",
                 "--mlflow", dead]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and f"--mlflow {dead}: the MLflow tracking server did not answer" in err[0]
    assert not (tmp_path / "none").exists()

    proc = subprocess.run(
        [sys.executable, "-m", "tune_age", "search", "--synthetic-n", str(SMALL_N), "--space", "quick",
         "--num-samples", "3", "--max-epochs", "2", "--storage", str(tmp_path), "--name", "tracked",
         "--cv", "1", "--mlflow", mlflow_server], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "tracked"
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    log = read_trials(exp / "trials.jsonl")
    assert sorted(r.data.tags["tune_age.trial_id"] for r in runs) == sorted(log)
    for run in runs:
        entry = log[run.data.tags["tune_age.trial_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["tune_age.baseline"] == str(bool(entry["config"].get("_baseline")))
        for key in ("lr", "batch_size", "conv_layers"):
            assert run.data.params[key] == str(entry["config"][key])
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert curve == {r["epoch"]: pytest.approx(r["val_acc"]) for r in result_lines(exp / entry["dir"])}
        best = best_of(trial_checkpoints(exp / entry["dir"]), "val_acc")
        assert run.data.tags["tune_age.best_epoch"] == str(best.epoch)
        got = client.download_artifacts(run.info.run_id, "best_checkpoint/checkpoint.pt", str(tmp_path / run.info.run_id))
        digest = [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in (got, best.path)]
        assert digest[0] == digest[1]
