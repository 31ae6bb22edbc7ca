"""Shared fixtures: a private cache for decoded and synthetic data, and one small real search.

The search runs through the CLI in a subprocess (`python -m tune_age search`),
so it exercises the whole path a user takes and leaves no Ray instance in the
test process; tests that need Ray in-process start it once per module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SMALL_N = 240  # synthetic faces: enough for every decade group to appear


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["TUNE_AGE_CACHE"] = str(path)
    return path


def run_cli(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m tune_age ARGS` in a subprocess; returns the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", "tune_age", *args],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tune-age {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def small_search(tmp_path_factory, cache_dir) -> Path:
    """A finished 4-trial search (seed baseline first, ASHA) on tiny synthetic data."""
    storage = tmp_path_factory.mktemp("results")
    proc = run_cli(
        "search", "--synthetic-n", str(SMALL_N), "--space", "quick", "--num-samples", "4",
        "--max-epochs", "3", "--storage", str(storage), "--name", "small", "--seed", "1", "--cv", "1",
    )
    exp = storage / "small"
    assert "best val_acc" in proc.stdout, proc.stdout
    assert "Token authentication is enabled" not in proc.stdout + proc.stderr  # said once in the README, not per search
    return exp
