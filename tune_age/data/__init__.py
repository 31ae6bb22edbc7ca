"""Everything a training run needs from the data: `load_data` -> `FaceData`.

From a DataConfig: read the manifest (utkface folder, group folders or CSV; the built-in
synthetic faces when `cfg.path` is None), decode every image once per requested size
(into the decode cache, which the images are mapped from: data/decode.py), drop what did
not decode, split into train/val/test stratified by age group with a seed, and measure
the per-channel mean/std on the train split only.

    data = load_data(DataConfig(path="~/data/UTKFace"), image_sizes=[64, "native"])
    x = data.images[data.resolve_size(64)][data.splits["train"]]   # uint8 N x 3 x 64 x 64
    y = data.labels[data.splits["train"]]
    data.split_table().to_csv("split.csv")                          # saved with every run
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .decode import (
    cache_root,
    decode_images,
    describe_sizes,
    file_stamps,
    header_sizes,
    square_size,
)
from .duplicates import FINDERS
from .mapped import MappedFile, select_rows
from .groups import AgeGroups, make_groups
from .sources import detect_format, read_manifest, require_two_groups

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_STATS_CHUNK = 1024  # images per step when measuring mean/std, to bound float memory


@dataclass
class FaceData:
    images: dict[int, np.ndarray]  # size -> uint8 N x 3 x S x S, same row order for every size
    labels: np.ndarray  # int64 [N] group index
    ages: np.ndarray  # float32 [N], NaN when unknown
    paths: list[str]
    splits: dict[str, np.ndarray]  # "train", "val", "test" -> int64 row indices
    groups: AgeGroups
    mean: list[float]  # per channel, in [0, 1] pixel units, from the train split only
    std: list[float]
    native_size: int | None
    fingerprint: str  # sha256 of the files (path, size, mtime), labels, bins and split settings
    skipped: list[tuple[str, str]]  # everything skipped, with a reason
    source: str  # for people: "utkface folder /x (3000 images)"
    sizes_seen: dict[tuple[int, int], int] = field(default_factory=dict)  # (w, h) -> count
    unevaluated: list[str] = field(default_factory=list)  # groups with no val image (too few)
    keys: dict[int, np.ndarray] = field(default_factory=dict)  # size -> image_keys of each row
    content: str = ""  # sha256 of the images' pixels, labels and split: the same data anywhere
    layout: str = ""  # "utkface", "folders" or "csv": how `root` is read
    root: Path | None = None  # the folder or CSV the paths were read from
    # sizes whose images a search hands its trials by file (mapped.hand_over): pickled
    # without their pixels, mapped again by open_mapped
    mapped: dict[int, MappedFile] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.mapped:
            state["images"] = {s: None if s in self.mapped else a for s, a in self.images.items()}
        return state

    def open_mapped(self) -> str:
        """In a trial: maps the images handed over by file (fetching them to this node once
        when they are on another); where they came from."""
        if not self.mapped:
            return "in Ray's object store"
        import ray

        from .mapped import file_server, open_file

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        refs = list(self.mapped.values())
        how = set()
        for size, ref in self.mapped.items():
            self.images[size], came = open_file(ref, node, lambda: file_server(refs))
            how.add(came)
        return "memory-mapped: " + ", ".join(sorted(how))

    def people(self) -> pd.DataFrame:
        """Gender and race of each row ("" when unknown), where the layout carries them."""
        from .sources import ATTRIBUTES, read_attributes

        if self.root is None:
            return pd.DataFrame({name: [""] * len(self.paths) for name in ATTRIBUTES})
        return read_attributes(self.paths, self.root, self.layout)

    def seen_keys(self, size: int) -> np.ndarray:
        """The image_keys of the train and validation images at `size`: what a model trained
        on this data has seen (a model file keeps them, so evaluate can leave them out)."""
        keys = self.keys.get(size)
        if keys is None:
            keys = self.keys[size] = image_keys(self.images[size])
        return np.unique(keys[np.concatenate([self.splits["train"], self.splits["val"]])])

    def resolve_size(self, size: int | str) -> int:
        """A pixel count for an image_size setting; "native" is the images' own square size."""
        return _resolve_size(size, self.native_size, self.sizes_seen, self.source)

    def split_table(self) -> pd.DataFrame:
        split = np.empty(len(self.paths), dtype=object)
        for name, rows in self.splits.items():
            split[rows] = name
        return pd.DataFrame(
            {
                "path": self.paths,
                "age": self.ages,
                "group": [self.groups.names[i] for i in self.labels],
                "split": split,
            }
        )

    def class_counts(self, split: str = "train") -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not one of {', '.join(self.splits)}")
        return np.bincount(self.labels[self.splits[split]], minlength=len(self.groups))


def _resolve_size(size: int | str, native: int | None, seen: dict, source: str) -> int:
    if size == "native":
        if native is None:
            sizes = describe_sizes(Counter(seen)) or "no readable image"
            raise DataError(
                f"image_size='native' needs images that are all one square size, but {source} "
                f"has {sizes}; set image_size=64 (or another pixel count)"
            )
        return native
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"image_size={size!r} is not valid; use a pixel count or 'native'")
    return size


def image_keys(images: np.ndarray) -> np.ndarray:
    """A 64-bit key per decoded image (blake2b of its pixels): equal pixels, equal keys."""
    return np.array([int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little",
                                    signed=True) for img in images], dtype=np.int64)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Row indices per split, drawn per group so each group has the same shares everywhere.

    Every group with at least 3 images gets at least one train and one val image (and one test
    image when test_fraction > 0); smaller groups go to train. Each group has its own random
    stream seeded by (seed, group), so adding images of one group leaves the others' split as is.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for group in np.unique(labels):
        rows = np.flatnonzero(labels == group)
        np.random.default_rng([seed, int(group)]).shuffle(rows)
        n = len(rows)
        if n < 3:
            parts["train"].append(rows)
            continue
        n_val = max(1, int(n * val_fraction + 0.5))
        n_test = max(1, int(n * test_fraction + 0.5)) if test_fraction > 0 else 0
        while n - n_val - n_test < 1:  # rounding up must not empty train
            if n_val >= n_test and n_val > 1:
                n_val -= 1
            else:
                n_test -= 1
        parts["val"].append(rows[:n_val])
        parts["test"].append(rows[n_val : n_val + n_test])
        parts["train"].append(rows[n_val + n_test :])
    return {
        name: np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else np.zeros(0, np.int64)
        for name, chunks in parts.items()
    }


def channel_stats(images: np.ndarray, rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images[rows] in [0, 1] units, accumulated in float64."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for start in range(0, len(rows), _STATS_CHUNK):
        chunk = images[rows[start : start + _STATS_CHUNK]].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if count == 0:
        raise DataError("the train split is empty; lower val_fraction/test_fraction")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    # A channel without variance (e.g. all-gray images) would divide by zero; leave it unscaled.
    std = np.where(std < 1e-6, 1.0, std)
    return mean.tolist(), std.tolist()


def _fingerprint(table: pd.DataFrame, cfg: DataConfig) -> str:
    rows = [
        [path, size, mtime, int(group), None if np.isnan(age) else float(age)]
        for (path, size, mtime), group, age in zip(
            file_stamps(table["path"].tolist()), table["group"], table["age"]
        )
    ]
    settings = [cfg.bins, cfg.val_fraction, cfg.test_fraction, cfg.split_seed]
    return hashlib.sha256(json.dumps([sorted(rows), settings]).encode()).hexdigest()


def content_fingerprint(data: FaceData) -> str:
    """What the data is wherever its files lie: each image's pixel key (at the smallest size
    decoded), group, age and split, with the bins. Equal for a copy of the files at another
    path or on another machine, where `fingerprint` (paths and mtimes) differs."""
    size = min(data.images)
    split = np.empty(len(data.labels), dtype=object)
    for name, rows in data.splits.items():
        split[rows] = name
    rows = sorted([int(k), int(g), None if np.isnan(a) else float(a), str(s)]
                  for k, g, a, s in zip(data.keys[size], data.labels, data.ages, split))
    return hashlib.sha256(json.dumps([size, rows, data.groups.to_dict()]).encode()).hexdigest()


def _warn_skipped(skipped: list[tuple[str, str]], total: int) -> None:
    first = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:5])
    log.warning("%d of %d images could not be decoded and were left out (first: %s)",
                len(skipped), total, first)


def _decode_all(
    paths: list[str], sizes: list[int], square: str, cache_dir: Path, progress: bool
) -> tuple[dict[int, np.ndarray], np.ndarray, list[tuple[str, str]]]:
    """Images per size for the rows that decoded at every size, that row mask, and the failures."""
    decoded = {
        s: decode_images(paths, s, square, cache_dir, progress=progress) for s in sizes
    }
    usable = np.ones(len(paths), dtype=bool)
    failed: dict[str, str] = {}
    for _, kept, bad in decoded.values():
        ok = np.zeros(len(paths), dtype=bool)
        ok[kept] = True
        usable &= ok
        failed.update(bad)
    # Sizes normally fail on the same files; where not, keep only rows that decoded at all.
    images = {
        s: imgs if len(kept) == usable.sum() else select_rows(imgs, usable[kept])
        for s, (imgs, kept, _) in decoded.items()
    }
    return images, usable, list(failed.items())


def _drop(table: pd.DataFrame, keep: np.ndarray, dropped: list[tuple[str, str]],
          skipped: list[tuple[str, str]], path: Path) -> pd.DataFrame:
    """The rows of `table` to keep; the dropped ones are added to `skipped` and logged."""
    if keep.all():
        return table
    skipped.extend(dropped)
    conflicts = sum("labels disagree" in why for _, why in dropped)
    first = "; ".join(f"{Path(p).name}: {why}" for p, why in dropped[:3])
    log.warning("%s: %d duplicate image(s) left out, %d of them because the copies' labels "
                "disagree (first: %s)", path, len(dropped), conflicts, first)
    return table[keep].reset_index(drop=True)


def _check_evaluable(labels: np.ndarray, splits: dict[str, np.ndarray], groups: AgeGroups,
                     path: Path) -> list[str]:
    """The groups the validation split cannot hold (fewer than 3 images); a DataError when
    it would hold a single group, on which always predicting that group scores 1.0."""
    counts = np.bincount(labels, minlength=len(groups))
    in_val = set(np.unique(labels[splits["val"]]).tolist())
    small = [i for i in np.flatnonzero(counts) if i not in in_val]
    named = ", ".join(f"{groups.names[i]} ({counts[i]} image{'s' if counts[i] != 1 else ''})" for i in small)
    if not in_val:
        raise DataError(
            f"{path}: no age group has the 3 images needed to put one in train and one in val "
            f"({len(labels)} images in all); add images or use wider bins"
        )
    if len(in_val) < 2:
        only = ", ".join(groups.names[i] for i in sorted(in_val)) or "none"
        raise DataError(
            f"{path}: the validation split would hold only one age group ({only}), where always "
            f"predicting it scores 1.0; {named or 'the other groups'} have fewer than the 3 images "
            "a group needs to reach it; add images or use wider bins (--bins)"
        )
    if small:
        log.warning("%s: age groups %s have fewer than 3 images: they are in the train split only "
                    "and no score covers them", path, named)
    return [groups.names[i] for i in small]


def find_source(cfg: DataConfig) -> tuple[Path, str, str]:
    """Where the config's images are, their layout and how to name them: the checks that fail
    fast (no such folder, an empty one, an unknown layout), before any decoding. Without a
    path, the built-in faces, drawn into the cache first if need be, which forks worker
    processes: a caller about to start threads (a search starting Ray beside the data load)
    calls this first."""
    if cfg.path is None:
        from .synthetic import ensure_synthetic  # lazily: only needed without a dataset

        root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
        path = Path(ensure_synthetic(n=cfg.synthetic_n, seed=cfg.synthetic_seed, cache_root=root))
        return path, "utkface", f"synthetic faces (n={cfg.synthetic_n}, seed={cfg.synthetic_seed})"
    path = Path(cfg.path).expanduser().absolute()
    fmt = detect_format(path, make_groups(cfg.bins)) if cfg.format == "auto" else cfg.format
    return path, fmt, f"{fmt} {'file' if path.is_file() else 'folder'}"


def load_data(cfg: DataConfig, image_sizes: Iterable[int | str], progress: bool = True,
              source: tuple[Path, str, str] | None = None) -> FaceData:
    """Reads, decodes (at each of image_sizes; "native" allowed), splits and measures the data;
    `source`: what find_source(cfg) returned, when the caller called it already."""
    groups = make_groups(cfg.bins)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
    path, fmt, what = source or find_source(cfg)
    if cfg.detect_faces:
        from .faces import aligned_source

        path = aligned_source(path, root)  # the same layout, one aligned crop per photo with a face
        what = f"aligned faces of a {what}"
    table, skipped = read_manifest(path, fmt, groups)
    # Sorting makes the split independent of the order the files were listed in.
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    paths = table["path"].tolist()

    sizes_seen = header_sizes(paths)
    native = square_size(sizes_seen)
    sizes = sorted({_resolve_size(s, native, sizes_seen, f"{what} {path}") for s in image_sizes})
    if not sizes:
        raise ValueError("load_data needs at least one image size")

    images, usable, failed = _decode_all(paths, sizes, cfg.square, root / "decoded", progress)
    if not usable.any():
        first = "; ".join(f"{Path(p).name}: {why}" for p, why in failed[:3])
        raise DataError(
            f"{path}: none of the {len(paths)} images could be decoded (first: {first})"
        )
    if failed:
        _warn_skipped(failed, len(paths))
    table = table[usable].reset_index(drop=True)
    # After decoding, so that copies of a broken file are reported as broken, not as copies.
    for find in FINDERS[cfg.dedupe]:
        keep, dropped = find(table, groups, images[min(sizes)])
        table = _drop(table, keep, dropped, skipped, path)
        images = {s: select_rows(a, keep) for s, a in images.items()}
    labels = table["group"].to_numpy(np.int64)
    require_two_groups(labels, groups, f"{path} (after leaving out undecodable and duplicate images)")

    splits = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    unevaluated = _check_evaluable(labels, splits, groups, path)
    mean, std = channel_stats(images[max(sizes)], splits["train"])
    data = FaceData(
        images=images,
        labels=labels,
        ages=table["age"].to_numpy(np.float32),
        paths=table["path"].tolist(),
        splits=splits,
        groups=groups,
        mean=mean,
        std=std,
        native_size=native,
        fingerprint=_fingerprint(table, cfg),
        skipped=skipped + failed,
        source=f"{what} {path} ({len(table)} images)",
        sizes_seen=dict(sizes_seen),
        unevaluated=unevaluated,
        keys={s: image_keys(a) for s, a in images.items()},
        layout=fmt,
        root=path,
    )
    data.content = content_fingerprint(data)
    log.info("%s: train %d, val %d, test %d", data.source,
             *(len(splits[name]) for name in SPLITS))
    return data
