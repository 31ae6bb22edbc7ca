"""Transfer learning end to end: a search whose trials train a head on frozen features (the
features computed once, then read from the cache), pretrained weights from --weights-dir, and a
missing weights file that stops the search before anything runs."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from tune_age.models.weights import weights_file
from tune_age.results import load_experiment
from tune_age.results.export import load_model

from conftest import SMALL_N, run_cli

pytestmark = pytest.mark.slow

HEAD_SPACE = """
search: {num_samples: 3, max_epochs: 4, grace_period: 2}
params:
  arch: mobilenet_v3_small
  pretrained: true
  freeze: head_only
  image_size: 32
  flip: false
  crop_scale: 1.0
  lr: {loguniform: [1.0e-3, 1.0e-1]}
  dropout: {uniform: [0.0, 0.5]}
"""


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """mobilenet_v3_small weights made here, under the file name torchvision's API gives."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict()
    torch.save(state, folder / weights_file("mobilenet_v3_small"))
    return folder


def features_of(exp_dir):
    exp = load_experiment(exp_dir)
    return {t["trial_id"]: {r.get("features") for r in exp.history(t)} for t in exp.trials.values()}


def test_head_trials_reuse_one_feature_computation(tmp_path, weights_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    space = tmp_path / "heads.yaml"
    space.write_text(HEAD_SPACE)
    common = ["search", "--synthetic-n", str(SMALL_N), "--space", str(space), "--weights-dir", str(weights_dir),
              "--storage", str(tmp_path / "results"), "--no-baseline", "--cv", "1"]
    run_cli(*common, "--name", "first")
    first = features_of(tmp_path / "results" / "first")
    assert len(first) == 3 and all(len(v) == 1 for v in first.values())
    sources = [next(iter(v)) for v in first.values()]
    assert sources.count("computed") == 1 and sources.count("cached") == 2, sources
    run_cli(*common, "--name", "second")
    assert all(v == {"cached"} for v in features_of(tmp_path / "results" / "second").values())
    # The export is the whole network (body and head) and predicts from photos.
    out = tmp_path / "best.pt"
    run_cli("export", str(tmp_path / "results" / "first"), "--out", str(out))
    loaded = load_model(out)
    assert loaded.cfg.arch == "mobilenet_v3_small" and loaded.mean == pytest.approx([0.485, 0.456, 0.406])
    faces = tmp_path / "faces"
    run_cli("synth", str(faces), "--n", "3")
    proc = run_cli("predict", str(out), str(faces), "--format", "json")
    assert len(json.loads(proc.stdout)) == 3


def test_a_missing_weights_file_stops_the_search_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("TUNE_AGE_WEIGHTS", raising=False)
    space = tmp_path / "r18.yaml"
    space.write_text(HEAD_SPACE.replace("mobilenet_v3_small", "resnet18"))
    proc = run_cli("search", "--synthetic-n", str(SMALL_N), "--space", str(space), "--storage",
                   str(tmp_path / "results"), "--name", "x", check=False, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "resnet18-f37072fd.pth" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "results" / "x").exists()
