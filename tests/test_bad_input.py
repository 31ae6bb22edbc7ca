"""Bad input through the CLI: one line naming the problem and what is valid, exit 2, no traceback."""

from __future__ import annotations

import pytest
from PIL import Image

from tune_age.cli import main

from conftest import SMALL_N


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune-age: error: "), err
    assert "Traceback" not in err
    return lines[0]


def face(path, color=(120, 90, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), color).save(path)


@pytest.fixture
def data(tmp_path):
    """A tiny CSV data set whose manifest each test breaks in its own way."""
    root = tmp_path / "data"
    for i in range(6):
        face(root / f"img{i}.jpg", (40 * i, 90, 80))
    (tmp_path / "outside.jpg").write_bytes((root / "img0.jpg").read_bytes())
    return root


@pytest.mark.parametrize(
    "rows, expected",
    [
        ("file,age\nimg0.jpg,30\n", r"labels\.csv: .*path"),
        ("path,age\nimg0.jpg,-1\nimg1.jpg,40\n", r"labels\.csv.*line 2.*-1"),
        ("path,age\nimg0.jpg,131\nimg1.jpg,40\n", r"labels\.csv.*line 2.*131"),
        ("path,age\nimg0.jpg,abc\nimg1.jpg,40\n", r"labels\.csv.*line 2.*abc"),
        ("path,age_group\nimg0.jpg,20-29\nimg1.jpg,twenties\n", r"twenties.*valid: 0-9, 10-19"),
        ("path,age\nimg0.jpg,30\nnope.jpg,40\n", r"nope\.jpg"),
        ("path,age\nimg0.jpg,30\n../outside.jpg,40\n", r"outside\.jpg.*outside"),
        ("path,age\nimg0.jpg,30\nimg1.jpg,35\n", r"only one age group \(30-39\)"),
    ],
)
def test_bad_csv_manifests(capsys, data, rows, expected):
    (data / "labels.csv").write_text(rows)
    line = one_line_error(capsys, ["train", "--data", str(data / "labels.csv"), "--out", str(data / "run")])
    import re

    assert re.search(expected, line), line
    assert not (data / "run").exists()


def test_bad_data_folders(capsys, tmp_path):
    line = one_line_error(capsys, ["train", "--data", str(tmp_path / "missing")])
    assert line.endswith("missing: no such file or folder")
    (tmp_path / "empty").mkdir()
    assert "empty" in one_line_error(capsys, ["train", "--data", str(tmp_path / "empty")])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no faces here")
    assert "no image" in one_line_error(capsys, ["train", "--data", str(notes)]).lower()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("20_0_0_x.jpg", "35_1_2_y.jpg"):
        (broken / name).write_bytes(b"not an image")
    assert "none of the 2 images could be decoded" in one_line_error(capsys, ["train", "--data", str(broken)])


@pytest.mark.parametrize(
    "space, expected",
    [
        ("params:\n  learning_rate: 0.1\n", "unknown key 'learning_rate'"),
        ("params:\n  lr: fast\n", "lr='fast' has the wrong type; expected float"),
        ("params:\n  lr: {loguniform: [0.1, 0.01]}\n", "low bound 0.1 is above high bound 0.01"),
        ("params:\n  optimizer: {choice: []}\n", "choice needs a non-empty list"),
        ("params:\n  lr: {gaussian: [0, 1]}\n", "unknown distribution 'gaussian'"),
        ("params:\n  lr: [0.1\n", "invalid YAML at line"),
        ("params:\n  image_size: {choice: [16, 64]}\n  conv_layers: 5\n",
         "image_size=16 is too small for conv_layers=5"),
    ],
)
def test_bad_search_spaces_fail_before_the_search(capsys, tmp_path, space, expected):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    line = one_line_error(capsys, ["search", "--space", str(path), "--synthetic-n", str(SMALL_N),
                                   "--storage", str(tmp_path / "results"), "--name", "bad"])
    assert expected in line and "space.yaml" in line
    assert not (tmp_path / "results" / "bad" / "trials.jsonl").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--num-samples", "0"], "--num-samples 0 is out of range; valid: 1 to inf"),
        (["--num-samples", "-3"], "--num-samples -3 is out of range"),
        (["--gpus-per-trial", "64"], "--gpus-per-trial 64 asks for more GPUs than the"),
        (["--metric", "accuracy"], "--metric 'accuracy' is not valid; choose one of val_acc"),
        (["--space", "nonexistent"], "no search space named 'nonexistent'; built-in spaces: default, quick"),
    ],
)
def test_bad_search_options(capsys, tmp_path, argv, expected):
    line = one_line_error(capsys, ["search", "--storage", str(tmp_path), "--name", "x", *argv])
    assert expected in line, line


def test_bad_train_options(capsys, tmp_path):
    assert "unknown key 'lrr' (did you mean 'lr'?)" in one_line_error(capsys, ["train", "lrr=0.1"])
    assert "not key=value" in one_line_error(capsys, ["train", "lr"])
    assert "bins='decadez' is neither a preset" in one_line_error(capsys, ["train", "--bins", "decadez"])
