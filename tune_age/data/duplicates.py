"""Duplicate images, found before the split so that no face sits on both sides of it.

- `exact` (the default): the same file listed twice, and files with the same bytes (an
  aligned and a copied crop, a folder copied into another). Only files of equal size are
  read and hashed.
- `near`: also images whose 64-bit difference hash (dHash of the 9 x 8 grey thumbnail of
  the decoded image) differs in at most NEAR_BITS bits: a re-encoded JPEG, a resized or
  lightly recompressed copy.

Each set of duplicates keeps its first row (in path order) when all of its labels agree;
when they disagree, every copy is dropped, since there is no telling which label is right.
Every dropped row is returned with its reason.

    keep, skipped = exact_duplicates(table, groups)          # file names and bytes
    keep, skipped = near_duplicates(table, groups, images)  # decoded images, row for row
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .groups import AgeGroups

NEAR_BITS = 4  # of 64: re-encoded copies differ in 0-2, different faces in 15 or more
_CHUNK = 512  # rows per step: a step's distance matrix is 512 x N uint64


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve(sets: list[list[int]], table: pd.DataFrame, groups: AgeGroups, how: str
             ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Keeps the first row of each set whose labels agree, none of a set whose labels do not."""
    keep = np.ones(len(table), dtype=bool)
    skipped = []
    paths, labels = table["path"].tolist(), table["group"].to_numpy()
    for rows in sets:
        rows = sorted(rows)
        first = Path(paths[rows[0]]).name
        names = sorted({groups.names[labels[r]] for r in rows})
        if len(names) == 1:
            for r in rows[1:]:
                keep[r] = False
                skipped.append((paths[r], f"duplicate of {first} ({how}); one copy kept"))
        else:
            for r in rows:
                keep[r] = False
                others = ", ".join(Path(paths[o]).name for o in rows if o != r)
                skipped.append((paths[r], f"duplicate of {others} ({how}) but the labels disagree "
                                          f"({' vs '.join(names)}); all copies dropped"))
    return keep, skipped


def exact_duplicates(table: pd.DataFrame, groups: AgeGroups, images: np.ndarray | None = None
                     ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Rows to keep, and the dropped ones with their reasons: same path or same bytes.
    (`images` is not needed; it is there so that both finders take the same arguments.)"""
    paths = table["path"].tolist()
    by_path: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        by_path[os.path.realpath(p)].append(i)
    listed_twice = [rows for rows in by_path.values() if len(rows) > 1]
    keep, skipped = _resolve(listed_twice, table, groups, "the same file listed twice")
    # Same bytes: only files that share a size can be equal, so hash only those.
    by_size: dict[int, list[int]] = defaultdict(list)
    for real, rows in by_path.items():
        first = min(rows)
        if keep[first] or len(rows) == 1:
            try:
                by_size[os.path.getsize(real)].append(first)
            except OSError:
                continue  # unreadable: decoding reports it
    candidates = [i for rows in by_size.values() if len(rows) > 1 for i in rows]
    with ThreadPoolExecutor(min(8, max(1, os.cpu_count() or 1))) as pool:
        digests = dict(zip(candidates, pool.map(lambda i: _sha256(paths[i]), candidates)))
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, d in digests.items():
        by_digest[d].append(i)
    same_bytes = [rows for rows in by_digest.values() if len(rows) > 1]
    keep2, skipped2 = _resolve(same_bytes, table, groups, "the same bytes")
    return keep & keep2, skipped + skipped2


def dhash(images: np.ndarray) -> np.ndarray:
    """64-bit difference hashes (uint64) of uint8 images N x 3 x S x S."""
    out = np.empty(len(images), dtype=np.uint64)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    bits = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)
    for start in range(0, len(images), _CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + _CHUNK])).float()
        grey = (x * weights).sum(1, keepdim=True)
        small = F.interpolate(grey, size=(8, 9), mode="area")[:, 0]
        diff = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(x), 64).numpy()
        out[start:start + len(x)] = (diff.astype(np.uint64) * bits).sum(1, dtype=np.uint64)
    return out


def near_duplicates(table: pd.DataFrame, groups: AgeGroups, images: np.ndarray,
                    max_bits: int = NEAR_BITS) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Rows to keep, and the dropped ones: images whose dHashes differ in <= max_bits bits."""
    hashes = dhash(images)
    parent = list(range(len(hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(hashes), _CHUNK):
        block = hashes[start:start + _CHUNK]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, :])
        for a, b in zip(*np.nonzero(distance <= max_bits)):
            a = int(a) + start
            if a < b:
                parent[root(int(b))] = root(a)
    sets: dict[int, list[int]] = defaultdict(list)
    for i in range(len(hashes)):
        sets[root(i)].append(i)
    found = [rows for rows in sets.values() if len(rows) > 1]
    return _resolve(found, table, groups, f"near-duplicate: dHash within {max_bits} bits")


# --dedupe: the finders each mode runs, in order
FINDERS = {"off": (), "exact": (exact_duplicates,), "near": (exact_duplicates, near_duplicates)}
