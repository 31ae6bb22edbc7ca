"""Data pipeline: manifests (utkface, folders, csv), decoding messy images, cache, split, stats.

Every test writes a handful of tiny images into tmp_path; the decode cache goes there too.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_age.config import DataConfig
from tune_age.data import FaceData, load_data, stratified_split
from tune_age.data import decode as decode_mod
from tune_age.data.decode import decode_images, decode_one, native_size
from tune_age.data.groups import make_groups
from tune_age.data.sources import detect_format, read_manifest
from tune_age.errors import DataError

DECADES = make_groups("decades")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_AGE_CACHE", str(tmp_path / "cache"))


def save(path: Path, color=(128, 128, 128), size=(24, 24), mode="RGB", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    return path


def utk_folder(root: Path, ages, size=(24, 24)) -> Path:
    for i, age in enumerate(ages):
        save(root / f"{age}_{i % 2}_0_2017011{i:04d}.jpg.chip.jpg", (age * 2 % 256, 80, 40), size)
    return root


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- manifests -----------------------------------------------------------------------------


def test_utkface_names_parse_and_bad_names_are_reported(tmp_path, caplog):
    root = tmp_path / "utk"
    save(root / "25_0_1_20170116174525125.jpg.chip.jpg")
    save(root / "3_1_20170109142408075.jpg")  # race missing, as in the real data
    save(root / "part2" / "61_0.PNG")  # nested folder, upper-case extension
    for bad in ("face.jpg", "x_25.jpg", "25.jpg", "200_0_0_1.jpg"):
        save(root / bad)
    (root / "notes.txt").write_text("not an image, not a name to parse")

    with caplog.at_level(logging.WARNING):
        table, skipped = read_manifest(root, "auto", DECADES)

    assert sorted(table["age"]) == [3.0, 25.0, 61.0]
    assert {Path(p).name: DECADES.names[g] for p, g in zip(table["path"], table["group"])} == {
        "25_0_1_20170116174525125.jpg.chip.jpg": "20-29",
        "3_1_20170109142408075.jpg": "0-9",
        "61_0.PNG": "60-69",
    }
    assert all(os.path.isabs(p) for p in table["path"])
    names = sorted(Path(p).name for p, _ in skipped)
    assert names == ["200_0_0_1.jpg", "25.jpg", "face.jpg", "x_25.jpg"]
    assert "over 130" in dict((Path(p).name, r) for p, r in skipped)["200_0_0_1.jpg"]
    assert "skipped 4 of 7" in caplog.text and "face.jpg" in caplog.text


def test_folders_layout(tmp_path):
    root = tmp_path / "faces"
    save(root / "20-29" / "a.jpg")
    save(root / "20-29" / "deeper" / "b.png")
    save(root / "90+" / "c.jpg")
    table, skipped = read_manifest(root, "auto", DECADES)
    assert detect_format(root, DECADES) == "folders"
    assert sorted(DECADES.names[g] for g in table["group"]) == ["20-29", "20-29", "90+"]
    assert table["age"].isna().all() and skipped == []


def test_folders_with_a_wrong_name_list_the_valid_names(tmp_path):
    root = tmp_path / "faces"
    save(root / "20-29" / "a.jpg")
    save(root / "adults" / "b.jpg")
    with pytest.raises(DataError, match=r"adults.*valid: 0-9, 10-19, .*90\+"):
        read_manifest(root, "folders", DECADES)
    with pytest.raises(DataError, match=r"cannot tell the layout.*adults.*--layout"):
        read_manifest(root, "auto", DECADES)


def test_csv_with_ages_and_with_groups(tmp_path):
    save(tmp_path / "img" / "a.jpg")
    save(tmp_path / "img" / "b.jpg")
    by_age = write_csv(tmp_path / "ages.csv", "path,age\nimg/a.jpg,34\n\nimg/b.jpg,7.5\n")
    table, _ = read_manifest(by_age, "auto", DECADES)
    assert table["age"].tolist() == [34.0, 7.5] and table["group"].tolist() == [3, 0]
    expected = [str((tmp_path / "img" / n).resolve()) for n in ("a.jpg", "b.jpg")]
    assert table["path"].tolist() == expected
    for column in ("age_group", "group"):
        text = f"path,{column}\nimg/a.jpg,30-39\nimg/b.jpg,90+\n"
        by_group = write_csv(tmp_path / f"{column}.csv", text)
        table, _ = read_manifest(by_group, "csv", DECADES)
        assert table["group"].tolist() == [3, 9] and table["age"].isna().all()


@pytest.mark.parametrize(
    "rows, match",
    [
        ("file,age\nimg/a.jpg,3\n", r"m\.csv: line 1: columns file, age; need path and age"),
        ("path,age\nimg/a.jpg,3\nimg/b.jpg,-1\n", r"m\.csv: line 3: age '-1' is not.*0 to 130"),
        ("path,age\nimg/a.jpg,131\n", r"line 2: age '131' is not valid"),
        ("path,age\nimg/a.jpg,abc\n", r"line 2: age 'abc' is not valid"),
        ("path,age_group\nimg/a.jpg,20-29\nimg/b.jpg,teen\n", r"line 3: .*'teen'.*valid: 0-9, 10"),
        (
            "path,age\nimg/a.jpg,3\nimg/nope.jpg,40\nimg/gone.jpg,50\n",
            r"2 path\(s\) do not exist \(first: line 3: img/nope.jpg\)",
        ),
        ("path,age\n../outside.jpg,30\n", r"line 2: path '\.\./outside\.jpg' resolves outside"),
        ("path,age\n{outside},30\n", r"line 2: path '.*outside\.jpg' resolves outside"),
        ("path,age\nimg/link.jpg,30\n", r"line 2: path 'img/link\.jpg' resolves outside"),
    ],
    ids=["missing-column", "negative", "over-130", "not-a-number", "unknown-group", "missing-path",
         "dotdot", "absolute", "symlink"],
)
def test_csv_errors_name_file_line_and_value(tmp_path, rows, match):
    outside = save(tmp_path / "outside.jpg")
    data = tmp_path / "data"
    save(data / "img" / "a.jpg")
    save(data / "img" / "b.jpg")
    (data / "img" / "link.jpg").symlink_to(outside)
    manifest = write_csv(data / "m.csv", rows.format(outside=outside))
    with pytest.raises(DataError, match=match):
        read_manifest(manifest, "auto", DECADES)


def test_detection_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_manifest(tmp_path / "missing", "auto", DECADES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder is empty"):
        read_manifest(tmp_path / "empty", "auto", DECADES)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files found"):
        read_manifest(tmp_path / "docs", "auto", DECADES)
    save(tmp_path / "holiday" / "IMG_0001.jpg")
    with pytest.raises(DataError, match=r"cannot tell the layout.*utkface.*folders.*csv.*--layout"):
        read_manifest(tmp_path / "holiday", "auto", DECADES)
    with pytest.raises(DataError, match=r"not a \.csv.*--layout"):
        read_manifest(save(tmp_path / "one.jpg"), "auto", DECADES)
    utk_folder(tmp_path / "young", [21, 25, 29])
    with pytest.raises(DataError, match=r"only one age group \(20-29\).*need at least two"):
        read_manifest(tmp_path / "young", "auto", DECADES)


# --- decoding ------------------------------------------------------------------------------


def test_messy_images_decode_or_are_skipped(tmp_path):
    d = tmp_path / "messy"
    gray = save(d / "gray.png", 100, mode="L")
    rgba = save(d / "rgba.png", (255, 0, 0, 0), mode="RGBA")  # fully transparent red
    cmyk = save(d / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK")  # red
    deep = d / "deep.png"
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    # A 40x20 photo, red on the left and blue on the right, stored sideways: orientation 6
    # turns it 90 degrees clockwise, so the upright image is 20x40 with red on top.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = d / "rotated.jpg"
    Image.fromarray(wide).save(rotated, exif=exif, quality=95)
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(d / "full.jpg")
    truncated = d / "truncated.jpg"
    truncated.write_bytes((d / "full.jpg").read_bytes()[:600])
    empty = d / "empty.jpg"
    empty.write_bytes(b"")
    text = d / "text.jpg"
    text.write_text("this is not a jpeg")

    paths = [str(p) for p in (gray, truncated, rgba, cmyk, empty, deep, rotated, text)]
    images, kept, skipped = decode_images(paths, 16, cache_dir=tmp_path / "c", progress=False)

    assert images.dtype == np.uint8 and images.shape == (5, 3, 16, 16) and images.flags.c_contiguous
    assert kept.dtype == np.int64 and kept.tolist() == [0, 2, 3, 5, 6]
    reasons = dict(skipped)
    assert sorted(reasons) == sorted([str(truncated), str(empty), str(text)])
    assert "truncated" in reasons[str(truncated)].lower() and "0 bytes" in reasons[str(empty)]
    assert "cannot identify" in reasons[str(text)]
    out = dict(zip((paths[i] for i in kept), images))
    assert (out[str(gray)] == 100).all()
    assert (out[str(rgba)] == 0).all()  # composited on black, not the hidden red
    assert out[str(cmyk)][:, 8, 8].tolist() == pytest.approx([255, 0, 0], abs=8)
    expected = round(40000 * 255 / 65535)  # scaled, not clipped to 255
    assert (np.abs(out[str(deep)].astype(int) - expected) <= 1).all()
    top, bottom = out[str(rotated)][:, 2, 13], out[str(rotated)][:, 13, 2]
    assert top[0] > 200 and top[2] < 60, "upright image should be red at the top right"
    assert bottom[2] > 200 and bottom[0] < 60, "and blue at the bottom left"


def test_pad_keeps_the_whole_image_on_black(tmp_path):
    wide = save(tmp_path / "wide.png", (255, 255, 255), size=(40, 20))
    image = decode_one(str(wide), 16, "pad")
    assert (image[:, :4] == 0).all() and (image[:, 12:] == 0).all()  # bars above and below
    assert (image[:, 5:11] == 255).all()
    assert (decode_one(str(wide), 16, "crop") == 255).all()


def test_decode_cache_is_used_and_invalidated(tmp_path, monkeypatch, caplog):
    root = utk_folder(tmp_path / "utk", [5, 15, 25])
    paths = sorted(str(p) for p in root.iterdir())
    first = decode_images(paths, 16, progress=False)
    folder = tmp_path / "cache" / "decoded"  # the default folder, under $TUNE_AGE_CACHE
    assert len(list(folder.glob("*.npy"))) == 1 and len(list(folder.glob("*.json"))) == 1
    assert isinstance(first[0], np.memmap) and not first[0].flags.writeable  # the cache file itself

    calls = []
    real = decode_mod.decode_one
    monkeypatch.setattr(decode_mod, "decode_one", lambda *a: calls.append(a) or real(*a))
    with caplog.at_level(logging.INFO, logger="tune_age.data.decode"):
        second = decode_images(paths, 16, progress=False)
    assert calls == [] and "mapped from cache" in caplog.text
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])

    decode_images(paths, 20, progress=False)  # another size is another cache entry
    assert len(calls) == 3
    os.utime(paths[0], ns=(1, 1))  # a changed file invalidates the entry
    decode_images(paths, 16, progress=False)
    assert len(calls) == 6
    for manifest in folder.glob("*.json"):  # an entry without its manifest is incomplete
        manifest.unlink()
    assert np.array_equal(decode_images(paths, 16, progress=False)[0], first[0]) and len(calls) == 9


def test_images_stay_in_their_cache_file_and_travel_to_trials_by_reference(tmp_path):
    """load_data maps the decode cache, and a dropped duplicate makes a file of the kept rows,
    never a copy in memory; handed over by file, the data pickle without their pixels and a
    trial maps the same rows again; small data under --memory-map auto go through Ray's
    object store as plain arrays, as before."""
    import pickle
    import shutil

    from tune_age.data.mapped import hand_over, reference

    rng = np.random.default_rng(0)
    root = tmp_path / "utk"
    root.mkdir()
    for i, age in enumerate([5, 15, 25, 35, 45, 55] * 4):
        noise = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / f"{age}_{i % 2}_0_2017011{i:04d}.png")
    shutil.copy(root / "5_0_0_20170110000.png", root / "5_0_0_20170119999.png")  # same bytes
    data = load_data(DataConfig(path=str(root)), [16], progress=False)
    assert len(data.paths) == 24 and len(data.skipped) == 1
    images = data.images[16]
    assert isinstance(images, np.memmap) and not images.flags.writeable
    ref = reference(images)
    assert ref is not None and ref.rows == 24 and "-" in Path(ref.path).stem  # the kept rows' own file
    expected = np.stack([decode_one(p, 16) for p in data.paths])
    assert np.array_equal(images, expected)

    assert hand_over(data, "on", capacity=1e12, node="").startswith("memory-mapped")
    blob = pickle.dumps(data)
    assert len(blob) < images.nbytes / 2  # file names, not pixels
    trial = pickle.loads(blob)
    assert trial.images[16] is None and trial.open_mapped() == "memory-mapped: the driver's file"
    assert np.array_equal(trial.images[16], expected)

    small = load_data(DataConfig(path=str(root)), [16], progress=False)
    assert hand_over(small, "auto", capacity=1e12, node="").startswith("in Ray's object store")
    assert type(small.images[16]) is np.ndarray and not small.mapped
    assert len(pickle.dumps(small)) > images.nbytes  # the pixels go along
    big = load_data(DataConfig(path=str(root)), [16], progress=False)
    assert hand_over(big, "auto", capacity=images.nbytes, node="").startswith("memory-mapped")


def test_a_node_fetches_a_mapped_file_once_for_all_its_trials(tmp_path, monkeypatch):
    """Four trials on a node without the driver's file start at once: one downloads it (in
    chunks) under the node's lock, the others wait and map that copy; a short answer from
    the driver's node is an error that leaves no copy behind."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tune_age.data import mapped

    monkeypatch.setattr(mapped, "CHUNK", 4096)
    source = tmp_path / "driver" / "key.npy"
    source.parent.mkdir()
    pixels = np.random.default_rng(1).integers(0, 255, (40, 3, 16, 16), dtype=np.uint8)
    np.save(source, pixels)
    ref = mapped.MappedFile(str(source), 30, source.stat().st_size, node="driver-node")
    downloads, lock = [], threading.Lock()

    def reader(short: bool = False):
        with lock:
            downloads.append(1)

        def read(offset: int, length: int):
            with open(source, "rb") as f:
                f.seek(offset)
                got = f.read(length - (1 if short else 0))
            return lambda: got
        return read

    target = tmp_path / "cache" / "decoded" / ref.name
    with ThreadPoolExecutor(4) as pool:
        took = list(pool.map(lambda _: mapped.fetch(target, ref.nbytes, reader), range(4)))
    assert len(downloads) == 1 and sum(t is not None for t in took) == 1
    assert target.read_bytes() == source.read_bytes()
    rows, how = mapped.open_file(ref, node="worker-node")
    assert how == "this node's copy" and np.array_equal(rows, pixels[:30])

    target.unlink()
    with pytest.raises(RuntimeError, match="bytes from the driver's node"):
        mapped.fetch(target, ref.nbytes, lambda: reader(short=True))
    assert not target.exists() and not list(target.parent.glob(".*.part.*"))


def test_native_size(tmp_path):
    same = [str(save(tmp_path / f"s{i}.png", size=(24, 24))) for i in range(2)]
    assert native_size(same) == 24
    assert native_size(same + [str(save(tmp_path / "w.png", size=(30, 24)))]) is None


# --- load_data: split, stats ---------------------------------------------------------------


def test_stratified_split_shares_and_seeds():
    labels = np.repeat([0, 1, 2, 3, 4], [100, 60, 40, 3, 2])
    splits = stratified_split(labels, 0.2, 0.1, seed=0)
    all_rows = np.concatenate(list(splits.values()))
    assert sorted(all_rows.tolist()) == list(range(len(labels)))  # a partition
    for group, n in [(0, 100), (1, 60), (2, 40)]:
        counts = {k: int((labels[v] == group).sum()) for k, v in splits.items()}
        assert counts["val"] == round(0.2 * n) and counts["test"] == round(0.1 * n)
    assert [int((labels[splits[k]] == 3).sum()) for k in ("train", "val", "test")] == [1, 1, 1]
    assert (labels[splits["train"]] == 4).sum() == 2  # too small to split
    again = stratified_split(labels, 0.2, 0.1, seed=0)
    other = stratified_split(labels, 0.2, 0.1, seed=1)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["val"], other["val"])
    assert len(stratified_split(labels, 0.2, 0.0, seed=0)["test"]) == 0


def test_load_data_end_to_end_is_order_independent_and_normalizes_on_train(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    levels = rng.choice(256, size=30, replace=False)  # distinct: equal images would be duplicates
    for i in range(30):
        level = int(levels[i])  # each image one gray level: train mean != overall mean
        save(tmp_path / "img" / f"{i:02d}.png", (level, level, 255 - level))
        rows.append(f"img/{i:02d}.png,{15 + 20 * (i % 2)}")
    save(tmp_path / "img" / "zz_broken.png").write_bytes(b"garbage")
    rows.append("img/zz_broken.png,20")
    write_csv(tmp_path / "a.csv", "path,age\n" + "\n".join(rows) + "\n")
    write_csv(tmp_path / "b.csv", "path,age\n" + "\n".join(reversed(rows)) + "\n")
    cfg = DataConfig(path=str(tmp_path / "a.csv"), val_fraction=0.2, test_fraction=0.2)

    data = load_data(cfg, [16, "native"], progress=False)
    assert isinstance(data, FaceData) and sorted(data.images) == [16, 24] and data.native_size == 24
    assert all(a.shape == (30, 3, s, s) for s, a in data.images.items())
    assert len(data.paths) == 30 and data.labels.dtype == np.int64 and data.ages.dtype == np.float32
    assert any("zz_broken" in p for p, _ in data.skipped)
    assert data.source.startswith("csv file") and "(30 images)" in data.source
    assert data.class_counts("train").sum() == len(data.splits["train"])
    assert data.class_counts("val").tolist()[1:4] == [3, 0, 3]

    train = data.images[24][data.splits["train"]].astype(np.float64) / 255
    everything = data.images[24].astype(np.float64) / 255
    assert data.mean == pytest.approx(train.mean(axis=(0, 2, 3)).tolist(), abs=1e-9)
    assert data.std == pytest.approx(train.std(axis=(0, 2, 3)).tolist(), abs=1e-9)
    assert abs(data.mean[0] - everything[:, 0].mean()) > 1e-3

    shuffled = load_data(cfg.replace(path=str(tmp_path / "b.csv")), [16], progress=False)
    table, other = data.split_table(), shuffled.split_table()
    assert list(table.columns) == ["path", "age", "group", "split"]
    assert table.equals(other) and shuffled.fingerprint == data.fingerprint
    reseeded = load_data(cfg.replace(split_seed=1), [16], progress=False)
    assert not reseeded.split_table()["split"].equals(table["split"])
    assert reseeded.fingerprint != data.fingerprint


def test_native_needs_one_square_size(tmp_path):
    root = utk_folder(tmp_path / "utk", [5, 6, 7, 15, 16, 17])
    save(root / "45_0_0_x.jpg", size=(30, 24))
    sizes = r"image_size='native'.*24x24 \(6\), 30x24 \(1\).*image_size=64"
    with pytest.raises(DataError, match=sizes):
        load_data(DataConfig(path=str(root)), ["native"], progress=False)
    data = load_data(DataConfig(path=str(root)), [16], progress=False)
    assert data.native_size is None and data.resolve_size(16) == 16
    with pytest.raises(DataError, match="image_size=64"):
        data.resolve_size("native")


def test_too_few_images_to_validate_is_an_error(tmp_path):
    root = utk_folder(tmp_path / "utk", [5, 6, 15, 16])  # two groups of two: all go to train
    with pytest.raises(DataError, match="no age group has the 3 images"):
        load_data(DataConfig(path=str(root)), [16], progress=False)


def test_all_broken_folder_is_an_error(tmp_path):
    root = tmp_path / "utk"
    root.mkdir()
    for name in ("20_0_0_a.jpg", "30_0_0_b.jpg"):
        (root / name).write_text(f"not an image: {name}")  # different bytes, else duplicates
    with pytest.raises(DataError, match=r"none of the 2 images could be decoded"):
        load_data(DataConfig(path=str(root)), [16], progress=False)


def test_no_path_reads_the_synthetic_folder(tmp_path, monkeypatch):
    made = {}

    def ensure_synthetic(n, seed, cache_root):  # stands in for tune_age.data.synthetic
        made.update(n=n, seed=seed, cache_root=cache_root)
        return utk_folder(tmp_path / "synthetic", [4, 5, 6, 14, 15, 16])

    fake = types.SimpleNamespace(ensure_synthetic=ensure_synthetic)
    monkeypatch.setitem(sys.modules, "tune_age.data.synthetic", fake)
    data = load_data(DataConfig(synthetic_n=10, synthetic_seed=3), [16], progress=False)
    assert made == {"n": 10, "seed": 3, "cache_root": tmp_path / "cache"}
    assert data.source.startswith("synthetic faces") and len(data.paths) == 6
    assert all(not math.isnan(a) for a in data.ages)


FAIRFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairface-540"


@pytest.mark.fairface
@pytest.mark.skipif(not FAIRFACE.is_dir() and os.environ.get("CI") != "true",
                    reason="needs ../shared/data/fairface-540 (in CI its absence fails the test)")
def test_fairface_sample_real_photos(tmp_path):
    cfg = DataConfig(path=str(FAIRFACE / "labels.csv"), bins="fairface", cache_dir=str(tmp_path))
    data = load_data(cfg, [32], progress=False)
    assert data.images[32].shape == (540, 3, 32, 32) and data.skipped == []
    assert data.native_size == 448
    assert data.class_counts("val").tolist() == [9] * 9  # 60 per group, stratified
    assert all(0.2 < m < 0.7 for m in data.mean) and all(0.1 < s < 0.4 for s in data.std)
