"""Scale-out: the study in a real PostgreSQL server (started here, in a temporary folder)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from conftest import SMALL_N, free_port

pytestmark = pytest.mark.slow


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    if found is None and os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL's {name} is not installed; .ci/run installs Debian's postgresql package")
    return found


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with trust authentication for the user `tune`;
    as root, it runs as the `postgres` user (initdb refuses root)."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("needs PostgreSQL's server (Debian's postgresql); in CI its absence fails the test")
    root = Path(tempfile.mkdtemp(prefix="tune_age_pg_"))  # not under pytest's folder: postgres must enter it
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "tune", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://tune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def search(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune_age", "search", "--synthetic-n", str(SMALL_N), "--space",
                           "quick", "--max-epochs", "2", "--cv", "1", *args], capture_output=True, text=True,
                          timeout=600)


def test_a_search_keeps_its_study_in_postgresql_and_every_tool_reads_it(postgres, tmp_path, capsys):
    from tune_age.cli import main
    from tune_age.results.report import param_importance
    from tune_age.results import load_experiment
    from tune_age.search.tracking import read_trials

    proc = search("--num-samples", "3", "--storage", str(tmp_path), "--name", "pg", "--study-storage", postgres)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "pg"
    assert not (exp / "study.db").exists()
    assert json.loads((exp / "tune_age.json").read_text())["search"]["study_storage"] == postgres
    study = optuna.load_study(study_name="pg", storage=postgres)
    log = read_trials(exp / "trials.jsonl")
    assert len(study.trials) == len(log) == 3
    for t in study.trials:
        entry = log[t.user_attrs["ray_trial_id"]]
        assert t.intermediate_values == {e: pytest.approx(v) for e, v, _ in entry["scores"]}
    # The report reads the study from the database (too few trials for importance, said so).
    _, note = param_importance(load_experiment(exp))
    assert note.startswith("Too few trials"), note
    # Resumed and grown: the searcher restored from Ray's state finds its study in the database.
    proc = search("--storage", str(tmp_path), "--name", "pg", "--resume", "--num-samples", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(optuna.load_study(study_name="pg", storage=postgres).trials) == len(read_trials(exp / "trials.jsonl")) == 4

    def refused(*args: str) -> str:
        code = main(["search", "--synthetic-n", str(SMALL_N), "--storage", str(tmp_path / "other"), *args])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1, lines
        assert not (tmp_path / "other").exists()  # refused before anything is written
        return lines[0]

    # A new search under a name the database already holds would mix two searches' trials.
    assert "a study named 'pg' is already there" in refused("--name", "pg", "--study-storage", postgres)
    with_password = postgres.replace("tune@", "tune:secret@")
    line = refused("--name", "x", "--study-storage", with_password)
    assert "holds a password" in line and "secret" not in line
    dead = postgres.rsplit(":", 1)[0] + ":1/postgres"
    assert "the database could not be opened" in refused("--name", "y", "--study-storage", dead)
    assert "not a database URL" in refused("--name", "z", "--study-storage", "nonsense")
