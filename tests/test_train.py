"""`tune-age train` and `tune-age synth` end to end on small synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tune_age.cli import main
from tune_age.data.groups import make_groups
from tune_age.data.sources import read_manifest

from conftest import SMALL_N


def test_train_writes_checkpoints_and_split_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--synthetic-n", str(SMALL_N), "--out", str(out), "epochs=3", "image_size=32",
            "conv_layers=2", "channels=8", "lr=0.01"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("epoch")] == ["1", "2", "3"]

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["image_size"] == 32
    assert state["config"]["lr"] == 0.01 and state["config"]["conv_layers"] == 2
    assert state["groups"]["names"][:2] == ["0-9", "10-19"] and len(state["norm"]["mean"]) == 3
    assert {"model", "optimizer", "scheduler", "rng", "history"} <= set(state)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["val_acc"] == max(h["val_acc"] for h in state["history"])
    assert f"best val_acc {best['metrics']['val_acc']:.4f}" in printed

    split = pd.read_csv(out / "split.csv")
    assert len(split) == SMALL_N and set(split["split"]) == {"train", "val", "test"}

    # Nothing already written is lost: a second run into the same folder is refused.
    assert main(argv) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_seed_baseline_space_file_trains_at_native_size(tmp_path, capsys):
    out = tmp_path / "baseline"
    assert main(["train", "--config", "search_spaces/seed_baseline.yaml", "--synthetic-n", str(SMALL_N),
                 "--out", str(out), "epochs=1"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["image_size"] == 128 and state["config"]["batch_size"] == 35
    assert state["config"]["head"] == "flatten" and state["config"]["optimizer"] == "adam"


def test_synth_writes_utkface_named_faces(tmp_path, capsys):
    out = tmp_path / "faces"
    assert main(["synth", str(out), "--n", "30", "--seed", "5", "--size", "64"]) == 0
    table, skipped = read_manifest(out, "auto", make_groups("decades"))
    assert len(table) == 30 and not skipped
    assert table["age"].notna().all()
    assert main(["synth", str(out), "--n", "30"]) == 2  # never writes into a used folder


def test_module_entry_point_and_help_state_defaults():
    proc = subprocess.run([sys.executable, "-m", "tune_age", "search", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--space" in proc.stdout and "(default: quick)" in proc.stdout
    assert "--max-failures" in proc.stdout and "(default: 2)" in proc.stdout


@pytest.mark.parametrize("command", ["synth", "train", "search", "trials", "report", "export", "predict", "evaluate"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: tune-age " + command in capsys.readouterr().out


def test_evaluate_leaves_out_what_the_model_saw(tmp_path, capsys):
    faces = tmp_path / "faces"
    assert main(["synth", str(faces), "--n", "120", "--seed", "9", "--size", "48"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--data", str(faces), "--out", str(out), "epochs=1", "image_size=32",
                 "conv_layers=2", "channels=8"]) == 0
    split = pd.read_csv(out / "split.csv")
    seen = int((split["split"] != "test").sum())
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.pt"), "--data", str(faces), "--format", "json"]) == 0
    unseen = json.loads(capsys.readouterr().out)
    assert unseen["seen"] == seen and unseen["n_images"] == 120 - seen and unseen["scored"] == "unseen"
    assert main(["evaluate", str(out / "best.pt"), "--data", str(faces), "--include-seen"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("120 images scored") and f"{seen} image(s) the model saw" in text
    # A folder of nothing but training images: nothing honest to score.
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for path in split.loc[split["split"] == "train", "path"]:
        (train_only / Path(path).name).symlink_to(path)
    assert main(["evaluate", str(out / "best.pt"), "--data", str(train_only)]) == 2
    assert "were seen by the model in training or validation" in capsys.readouterr().err
