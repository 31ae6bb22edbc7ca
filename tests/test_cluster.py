"""A real local two-node Ray cluster: trials run on both nodes, and survive losing the worker node.

Both nodes are started with `ray start`, bound to 127.0.0.1, with token
authentication on for every process (Ray 2.60 refuses a second node
without it). Teardown stops only the processes of this cluster, found by its
private temp folder, never other Ray instances on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tune_age.search.tracking import FINAL, read_trials

from conftest import SMALL_N, run_cli

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port, worker_port = free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}",
                        *common], env=env, check=True, capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{port}", "env": env, "worker_marker": f"--node_manager_port={worker_port}"}
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


def test_trials_run_on_both_nodes(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    nodes = node_ids(cluster["address"], cluster["env"])
    assert len(nodes) == 2
    run_cli("search", "--address", cluster["address"], "--synthetic-n", str(SMALL_N), "--num-samples", "4",
            "--max-epochs", "2", "--storage", str(tmp_path), "--name", "two-nodes", "--no-baseline", "--cv", "1")
    trials = read_trials(tmp_path / "two-nodes" / "trials.jsonl")
    assert len(trials) == 4 and all(t["status"] in FINAL for t in trials.values())
    assert {t["last"]["node_id"] for t in trials.values()} == set(nodes)


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
