"""A non-editable install ships the search spaces, so `--space quick` works anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_spaces_and_names_resolve_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    wheel = next(wheels.glob("tune_age-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("tune_age/search_spaces/")}
    assert shipped == {p.name for p in (REPO / "search_spaces").glob("*.yaml")}
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import tune_age.search.spaces as s; print(s.__file__); "
            "print(s.load_space('quick').settings['num_samples'], s.seed_baseline().batch_size)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, timeout=120, check=True).stdout.split()
    assert out[0].startswith(str(target))  # the installed copy, not the checkout
    assert out[1:] == ["10", "35"]
