"""The synthetic face generator: ages, determinism, file names, age cues, caching."""

from __future__ import annotations

import re
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from tune_age.data import synthetic
from tune_age.errors import DataError
from tune_age.data.synthetic import draw_face, ensure_synthetic, sample_ages, write_synthetic

UTK_NAME = re.compile(r"^(\d+)_([01])_([0-4])_(\d{17})\.jpg\.chip\.jpg$")


def _folder_bytes(folder, pattern="*"):
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def test_ages_look_like_a_face_data_set():
    ages = sample_ages(2000, np.random.default_rng(0))
    assert ages.dtype.kind == "i" and ages.shape == (2000,)
    assert ages.min() >= 0 and ages.max() <= 100
    assert 0.06 < np.mean(ages < 10) < 0.2  # children present
    adults = ages[ages >= 20]
    assert np.mean(adults < 40) > 0.5  # most adults are 20-39
    assert 0.01 < np.mean(ages >= 70) < 0.12  # a long tail
    assert np.sum(ages >= 90) >= 3
    assert 22 <= np.median(adults) <= 35
    assert np.array_equal(ages, sample_ages(2000, np.random.default_rng(0)))


def test_faces_are_rgb_of_the_requested_size_and_deterministic():
    for size in (48, 128):
        image = draw_face(30, np.random.default_rng(1), size=size)
        assert image.mode == "RGB" and image.size == (size, size)
    a = np.asarray(draw_face(30, np.random.default_rng(1)))
    b = np.asarray(draw_face(30, np.random.default_rng(1)))
    c = np.asarray(draw_face(30, np.random.default_rng(2)))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(float)
    hi, lo = rgb.max(-1), rgb.min(-1)
    return (hi - lo) / np.maximum(hi, 1)


def test_hair_greys_with_age_for_the_same_person_and_photo():
    # Same generator state, other age: only the age cues change. Where the two
    # images differ most (hair, beard, wrinkles), the old face is less saturated.
    drops = []
    for seed in range(12):
        young = np.asarray(draw_face(20, np.random.default_rng(seed), gender=1))
        old = np.asarray(draw_face(80, np.random.default_rng(seed), gender=1))
        changed = np.abs(young.astype(int) - old).sum(-1) > 60
        if changed.sum() < 50:
            continue  # e.g. hair under a hat or dyed: no visible change there
        drops.append(_saturation(young)[changed].mean() - _saturation(old)[changed].mean())
    assert len(drops) >= 8
    assert np.mean(np.array(drops) > 0) >= 0.75 and np.mean(drops) > 0.1


def test_age_cues_move_in_the_intended_direction_on_average():
    looks = [synthetic._sample_look(np.random.default_rng(i), i % 2, i % 5) for i in range(300)]

    def mean(age, key):
        return np.mean([synthetic._age_traits(age, look)[key] for look in looks])

    # children: a rounder head with the eyes lower on it, up to adulthood
    assert mean(2, "b") < mean(10, "b") < mean(25, "b")
    assert mean(2, "v_eye") > mean(10, "v_eye") > mean(25, "v_eye")
    # adults: wrinkles, grey hair and a receding hairline grow with age
    for key in ("wrinkle", "grey", "thin", "skin_age", "spots"):
        values = [mean(age, key) for age in (20, 40, 60, 80)]
        assert values == sorted(values) and values[-1] > values[0], key
    assert mean(20, "wrinkle") < 0.005 and mean(20, "grey") < 0.01
    assert mean(80, "hairline") < mean(20, "hairline")  # higher on the head


def test_files_are_utkface_named_deterministic_and_independent_of_workers(tmp_path):
    paths = write_synthetic(tmp_path / "a", n=12, seed=3, size=32, workers=1)
    assert len(paths) == 12 and all(p.exists() for p in paths)
    ages = []
    for p in paths:
        m = UTK_NAME.match(p.name)
        assert m, p.name
        datetime.strptime(m.group(4)[:14], "%Y%m%d%H%M%S")
        ages.append(int(m.group(1)))
        with Image.open(p) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert sorted(ages) == sorted(sample_ages(12, np.random.default_rng(3)).tolist())

    write_synthetic(tmp_path / "b", n=12, seed=3, size=32, workers=2)
    write_synthetic(tmp_path / "c", n=12, seed=4, size=32, workers=2)
    assert _folder_bytes(tmp_path / "a") == _folder_bytes(tmp_path / "b")
    assert set(_folder_bytes(tmp_path / "a", "*.jpg")).isdisjoint(_folder_bytes(tmp_path / "c", "*.jpg"))


def test_existing_folder_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "faces"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        write_synthetic(out, n=3, size=16)
    assert (out / "mine.txt").read_text() == "keep"
    write_synthetic(out, n=3, size=16, overwrite=True)
    assert not (out / "mine.txt").exists() and len(list(out.glob("*.jpg"))) == 3


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real = synthetic._face_file

    def fail_at_five(seed, i, age, size):
        if i == 5:
            raise KeyboardInterrupt
        return real(seed, i, age, size)

    monkeypatch.setattr(synthetic, "_face_file", fail_at_five)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "faces", n=8, size=16, workers=1)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden draft


def test_ensure_synthetic_draws_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_AGE_CACHE", str(tmp_path / "cache"))
    folder = ensure_synthetic(n=10, seed=1, size=24)
    assert folder == tmp_path / "cache" / "synthetic" / f"n10-s1-px24-v{synthetic.VERSION}"
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 10
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def no_drawing(*args, **kwargs):
        raise AssertionError("the cached faces were drawn again")

    monkeypatch.setattr(synthetic, "_draw_into", no_drawing)
    assert ensure_synthetic(n=10, seed=1, size=24) == folder
    assert {p: p.stat().st_mtime_ns for p in sorted(folder.glob("*.jpg"))} == stamps


def test_ensure_synthetic_redraws_an_incomplete_cache(tmp_path):
    folder = ensure_synthetic(n=10, seed=1, size=24, cache_root=tmp_path)
    before = _folder_bytes(folder)
    next(folder.glob("*.jpg")).unlink()
    assert ensure_synthetic(n=10, seed=1, size=24, cache_root=tmp_path) == folder
    assert _folder_bytes(folder) == before
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [folder.name]
