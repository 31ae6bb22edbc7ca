"""A real local two-node Ray cluster: trials run on both nodes, and survive losing the worker node.

Both nodes are started with `ray start`, bound to 127.0.0.1, with token
authentication on for every process (Ray 2.60 refuses a second node
without it). Teardown stops only the processes of this cluster, found by its
private temp folder, never other Ray instances on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tune_age.search.tracking import FINAL, read_trials

from conftest import SMALL_N, free_port, run_cli

pytestmark = pytest.mark.slow

SLOW_SPACE = """\
description: fixed, slow enough trials to catch one running on the worker node
search: {num_samples: 4, max_epochs: 6}
params:
  image_size: 48
  conv_layers: 3
  channels: 32
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""



def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), read from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def kill_tree(marker: str) -> None:
    """SIGKILLs every process whose command line holds `marker`, and their descendants."""
    procs = processes()
    doomed = {pid for pid, (_, cmd) in procs.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        grew = bool(children)
        doomed |= children
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp_dir = tempfile.mkdtemp(prefix="ta_ray_", dir="/tmp")
    port, worker_port, dashboard = free_port(), free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        # The dashboard serves Ray's job API, for `ray job submit` (ray[default]).
        subprocess.run(["ray", "start", "--head", f"--port={port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        # The worker node keeps its own cache folder, as a machine of its own would.
        worker_cache = Path(temp_dir) / "worker-cache"
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}",
                        *common], env={**env, "TUNE_AGE_CACHE": str(worker_cache)}, check=True,
                       capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "env": env, "worker_marker": f"--node_manager_port={worker_port}",
               "jobs": f"http://127.0.0.1:{dashboard}", "worker_cache": worker_cache}
    finally:
        kill_tree(temp_dir)


def node_ids(address: str, env: dict) -> dict[str, bool]:
    """node id -> is head, asked of the cluster from a short-lived driver."""
    code = (
        "import ray; ray.init(address=%r, log_to_driver=False)\n"
        "for n in ray.nodes():\n"
        "    print(n['NodeID'], n['Alive'], 'node:__internal_head__' in n['Resources'])\n" % address
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    rows = [line.split() for line in out.stdout.splitlines() if line.count(" ") == 2]
    return {nid: head == "True" for nid, alive, head in rows if alive == "True"}


def test_trials_run_on_both_nodes_and_the_worker_fetches_mapped_images_once(cluster, tmp_path, monkeypatch):
    """--memory-map on: trials on the head map the driver's decode-cache file; on the worker
    node (its own cache folder) the first trial fetches it from the driver's node, the next
    map that copy."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    nodes = node_ids(cluster["address"], cluster["env"])
    assert len(nodes) == 2
    proc = run_cli("search", "--address", cluster["address"], "--synthetic-n", str(SMALL_N), "--num-samples",
                   "4", "--max-epochs", "2", "--storage", str(tmp_path), "--name", "two-nodes", "--no-baseline",
                   "--cv", "1", "--memory-map", "on")
    assert "images: memory-mapped from the decode cache" in proc.stdout + proc.stderr
    trials = read_trials(tmp_path / "two-nodes" / "trials.jsonl")
    assert len(trials) == 4 and all(t["status"] in FINAL for t in trials.values())
    assert {t["last"]["node_id"] for t in trials.values()} == set(nodes)
    came = {head: [t["last"]["images_from"] for t in trials.values() if nodes[t["last"]["node_id"]] == head]
            for head in (True, False)}
    assert set(came[True]) == {"memory-mapped: the driver's file"}, came
    fetched = [c for c in came[False] if c.startswith("memory-mapped: fetched from the driver's node")]
    assert len(fetched) == 1 and came[False].count("memory-mapped: this node's copy") == len(came[False]) - 1, came
    copies = sorted((cluster["worker_cache"] / "decoded").glob("*.npy"))  # one per image size searched
    assert copies and {c.name for c in (cluster["worker_cache"] / "decoded").iterdir()} <= {
        *(c.name for c in copies), *(f".{c.name}.lock" for c in copies)}
    for copy in copies:
        assert copy.read_bytes() == (Path(os.environ["TUNE_AGE_CACHE"]) / "decoded" / copy.name).read_bytes()


# --- a cluster whose nodes share no folder: results in an S3-compatible store ----------------


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 with a bucket, and the AWS variables that
    point at it (what a user sets for MinIO, Ceph or AWS itself)."""
    import urllib.request

    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    serve = "import sys; from moto.server import main; sys.exit(main())"  # moto_server's console script
    server = subprocess.Popen([sys.executable, "-c", serve, "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "tune-age-test",
           "AWS_SECRET_ACCESS_KEY": "tune-age-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-2000:]
                time.sleep(0.25)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="tune-age")
        yield {"env": env, "s3": s3}
    finally:
        server.terminate()
        server.wait(timeout=20)


def remote_trials(s3, key: str) -> dict:
    import json

    try:
        text = s3.get_object(Bucket="tune-age", Key=key)["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return {}
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {e["trial_id"]: e for e in entries}


def test_a_search_in_an_object_store_survives_its_driver_and_resumes_from_an_empty_folder(
        cluster, object_store, tmp_path, monkeypatch):
    """Two nodes, no shared folder: every result goes to the S3 server. The driver is killed
    (SIGKILL) with trials running; a driver started in another, empty working folder with its
    own cache resumes the search from the store and finishes it, rerunning no finished trial."""
    import json

    from tune_age.results import load_experiment
    from tune_age.results.export import best_checkpoint

    env = {**cluster["env"], **object_store["env"]}
    space = tmp_path / "slower.yaml"
    # Trials of 30 epochs (several seconds each even on an idle machine): the store's trial
    # log, uploaded every 5 s, shows one done while another runs.
    space.write_text(SLOW_SPACE.replace("max_epochs: 6", "max_epochs: 30"))
    uri = "s3://tune-age/runs"
    args = ["search", "--address", cluster["address"], "--space", str(space), "--synthetic-n", str(SMALL_N),
            "--storage", uri, "--name", "no-nfs", "--no-baseline", "--scheduler", "fifo", "--cv", "1"]
    first, again = tmp_path / "first", tmp_path / "again"
    for folder in (first, again):
        (folder / "cache").mkdir(parents=True)
    log = first / "search.log"
    driver = subprocess.Popen([sys.executable, "-m", "tune_age", *args], cwd=first, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, env={**env, "TUNE_AGE_CACHE": str(first / "cache")})
    s3 = object_store["s3"]
    deadline = time.time() + 300
    while True:  # the store's trial log (uploaded on every heartbeat): one trial done, one running
        trials = remote_trials(s3, "runs/no-nfs/trials.jsonl")
        done = {k for k, t in trials.items() if t["status"] in FINAL}
        if done and any(t["status"] == "running" for t in trials.values()):
            break
        assert driver.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    driver.kill()
    driver.wait(timeout=30)
    epochs_before = {k: trials[k]["epochs"] for k in done}

    log = again / "search.log"
    resumed = subprocess.run([sys.executable, "-m", "tune_age", *args, "--resume"],
                             cwd=again, stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=600,
                             env={**env, "TUNE_AGE_CACHE": str(again / "cache")})
    assert resumed.returncode == 0, log.read_text()[-3000:]
    assert "took over the lock of a driver that is no longer running" in log.read_text(), log.read_text()[:3000]

    # Read back from the store, as `tune-age trials s3://...` does on any machine.
    for name, value in object_store["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TUNE_AGE_CACHE", str(tmp_path / "reader"))
    exp = load_experiment(f"{uri}/no-nfs")
    assert len(exp.trials) == 4 and all(t["status"] == "completed" for t in exp.trials.values()), exp.trials
    for trial_id in done:  # finished before the kill: no epoch of it trained again
        entry = exp.trials[trial_id]
        assert entry["epochs"] == epochs_before[trial_id] == 30
        assert [s[1] for s in entry["scores"]] == [s[1] for s in trials[trial_id]["scores"]], (entry, trials[trial_id])
        lines = (exp.path / entry["dir"] / "result.json").read_text().splitlines()
        assert [json.loads(ln)["epoch"] for ln in lines] == list(range(1, 31)), lines
        # (Ray's own state may not have uploaded the trial's end before the kill: then the new
        # driver starts it once more from its last checkpoint, which is its end, and it stops.)
        assert entry["starts"] <= 2, entry
    assert len({t["last"]["node_id"] for t in exp.trials.values()}) == 2, exp.trials  # both nodes ran trials
    assert best_checkpoint(exp).path.is_file()  # checkpoints uploaded by the workers, read back
    assert not (first / "no-nfs").exists() and not (again / "no-nfs").exists()


def test_ray_job_submit_runs_a_search_on_the_cluster(cluster, tmp_path, cache_dir):
    """The way most clusters are used: the search is a Ray job, its driver on the head."""
    import json

    runtime_env = json.dumps({"env_vars": {"TUNE_AGE_CACHE": str(cache_dir)}})
    deadline = time.time() + 120
    while True:  # the head's job agent starts a few seconds after `ray start` returns
        proc = subprocess.run(
            ["ray", "job", "submit", "--address", cluster["jobs"], "--runtime-env-json", runtime_env, "--",
             "tune-age", "search", "--address", "auto", "--synthetic-n", str(SMALL_N), "--num-samples", "4",
             "--max-epochs", "2", "--storage", str(tmp_path), "--name", "as-a-job", "--no-baseline", "--cv", "1"],
            env=cluster["env"], capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "best val_acc" in proc.stdout  # the search's own summary, streamed back by the job
    trials = read_trials(tmp_path / "as-a-job" / "trials.jsonl")
    assert len(trials) == 4 and all(t["status"] in FINAL for t in trials.values())
    assert len({t["last"]["node_id"] for t in trials.values()}) == 2


# Last: it kills the worker node, which the tests above need.
def test_losing_the_worker_node_retries_its_trial_on_the_head(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    nodes = node_ids(cluster["address"], cluster["env"])
    worker = next(nid for nid, head in nodes.items() if not head)
    space = tmp_path / "slow.yaml"
    space.write_text(SLOW_SPACE)
    log = tmp_path / "search.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tune_age", "search", "--address", cluster["address"], "--space", str(space),
         "--synthetic-n", str(SMALL_N), "--storage", str(tmp_path), "--name", "lose-node", "--no-baseline",
         "--scheduler", "fifo", "--max-failures", "3", "--cv", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=cluster["env"],
    )
    trials_file = tmp_path / "lose-node" / "trials.jsonl"

    def running_on_worker() -> list:
        return [t for t in read_trials(trials_file).values()
                if t["status"] == "running" and (t.get("last") or {}).get("node_id") == worker]

    deadline = time.time() + 300
    while not running_on_worker():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.3)
    victim = running_on_worker()[0]["trial_id"]
    kill_tree(cluster["worker_marker"])
    assert proc.wait(timeout=480) == 0, log.read_text()
    trials = read_trials(trials_file)
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials.values()), trials
    assert trials[victim]["attempts"] >= 2 and trials[victim]["errors"]
    assert trials[victim]["last"]["node_id"] != worker  # finished on the head
    assert f"trial {victim} completed after {trials[victim]['attempts']} attempt(s)" in log.read_text()
