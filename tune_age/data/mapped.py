"""Images that stay in their decode-cache file: memory-mapped, shared through the page cache,
handed to trials by reference.

A search whose decoded images would crowd Ray's object store (or that asks with
`--memory-map on`) sends its trials a `MappedFile` per image size instead of the pixels.
A trial on the driver's node maps the driver's cache file: the kernel shares its pages
between all trials and may drop and re-read them, so the data can be larger than memory.
A trial on another node maps its node's copy, which the first trial there downloads from
the driver's node (a `FileServer` actor there) under a file lock: once per node, not per
trial.

    ref = reference(data.images[64], node)   # None for an array in memory
    images, how = open_file(ref, node, server)  # in a trial: the rows, and where they came from
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .decode import cache_root

log = logging.getLogger(__name__)

CHUNK = 32 << 20  # bytes per request when a node downloads a file
IN_FLIGHT = 4  # requests under way at once
# --memory-map auto maps the images when they would take more than this share of the
# object store of the driver's node (Ray's default store is 30 % of its memory).
AUTO_SHARE = 0.5


@dataclass(frozen=True)
class MappedFile:
    """Where the rows of one image array are: the first `rows` rows of a .npy file."""

    path: str  # the driver's file
    rows: int
    nbytes: int  # the file's size
    node: str  # the Ray node the driver's file is on ("" outside Ray)

    @property
    def name(self) -> str:
        """Its name in a node's cache folder (a content key: the same name, the same rows)."""
        return Path(self.path).name


def reference(array: np.ndarray, node: str = "") -> MappedFile | None:
    """The file `array` maps, when it is the first rows of a .npy file (what decode_images
    and select_rows return); None for an array in memory."""
    path = getattr(array, "filename", None)
    if not isinstance(array, np.memmap) or path is None or not array.flags.c_contiguous or not len(array):
        return None
    whole, rows = np.load(path, mmap_mode="r"), len(array)
    # a view that starts at row 0: its first and last rows are the file's
    if rows > len(whole) or whole.shape[1:] != array.shape[1:] or not (
            np.array_equal(whole[0], array[0]) and np.array_equal(whole[rows - 1], array[-1])):
        return None
    return MappedFile(str(path), rows, os.path.getsize(path), node)


def select_rows(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """array[keep] for a boolean mask. For a mapped array, a new .npy beside its file holding
    those rows (named by the file and the rows, so made once), mapped: a data set larger than
    memory is never copied into memory; in memory where that file cannot be written."""
    ref = reference(array)
    if ref is None or keep.all():
        return array if keep.all() else array[keep]
    rows = np.flatnonzero(keep)
    source = Path(ref.path)
    target = source.with_name(f"{source.stem}-{hashlib.sha256(rows.tobytes()).hexdigest()[:16]}.npy")
    shape = (len(rows), *array.shape[1:])
    try:
        if not (target.is_file() and np.load(target, mmap_mode="r").shape == shape):
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=shape)
                for start in range(0, len(rows), 1024):
                    out[start:start + 1024] = array[rows[start:start + 1024]]
                out.flush()
                del out
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return np.load(target, mmap_mode="r")
    except OSError as exc:
        log.warning("could not write %s (%s): those images are copied into memory", target, exc)
        return array[keep]


def open_file(ref: MappedFile, node: str = "", server: Callable[[], object] | None = None
              ) -> tuple[np.ndarray, str]:
    """The rows `ref` names, mapped read-only, and where they came from: the driver's file
    (same node), this node's copy, or a copy fetched now from the driver's node through the
    FileServer actor that `server()` returns."""
    if not ref.node or node == ref.node:
        return _rows(Path(ref.path), ref), "the driver's file"
    target = cache_root() / "decoded" / ref.name
    took = fetch(target, ref.nbytes, lambda: _reader(server, ref))
    return _rows(target, ref), (f"fetched from the driver's node in {took:.1f} s" if took is not None
                                else "this node's copy")


def _rows(path: Path, ref: MappedFile) -> np.ndarray:
    images = np.load(path, mmap_mode="r")
    if len(images) < ref.rows:
        raise RuntimeError(f"{path}: holds {len(images)} images, the search has {ref.rows}")
    return images[: ref.rows]


def fetch(target: Path, nbytes: int, reader: Callable[[], Callable[[int, int], Callable[[], bytes]]]
          ) -> float | None:
    """Makes `target` a whole copy (`nbytes` long) of the driver's file, unless this node
    has one: the first process here downloads it, the others wait on the lock and use it.
    `reader()` gives a function that asks for the bytes at (offset, length) and returns a
    function that waits for them.
    Returns the seconds the download took, None when the copy was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and target.stat().st_size == nbytes:
            return None
        started = time.time()
        part = target.with_name(f".{target.name}.part.{os.getpid()}")
        try:
            read = reader()
            with open(part, "wb") as out:
                pending = []
                for offset in range(0, nbytes, CHUNK):
                    pending.append(read(offset, min(CHUNK, nbytes - offset)))
                    if len(pending) >= IN_FLIGHT:
                        out.write(pending.pop(0)())
                for chunk in pending:
                    out.write(chunk())
            if part.stat().st_size != nbytes:
                raise RuntimeError(f"{target.name}: got {part.stat().st_size} of {nbytes} bytes from the driver's node")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        took = time.time() - started
        log.info("fetched %s (%.0f MiB) from the driver's node in %.1f s", target.name, nbytes / 2**20, took)
        return max(took, 1e-3)


def _reader(server: Callable[[], object] | None, ref: MappedFile):
    import ray

    if server is None:
        raise RuntimeError(f"{ref.name} is on another node and no file server was given")
    actor = server()

    def read(offset: int, length: int):
        pending = actor.read.remote(ref.path, offset, length)
        return lambda: ray.get(pending)

    return read


class FileServer:
    """Serves byte ranges of the driver's cache files to other nodes (a Ray actor on the
    driver's node; see `file_server`). Only the files it was started with."""

    def __init__(self, paths: list[str]):
        self.paths = set(paths)

    def read(self, path: str, offset: int, length: int) -> bytes:
        if path not in self.paths:
            raise PermissionError(f"{path} is not one of the search's image files")
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)


def file_server(refs: list[MappedFile]):
    """The FileServer of these files on the driver's node (a named actor, num_cpus=0): the
    driver starts it when the cluster has other nodes; a trial on a node that joined later
    starts it, and the others find it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = sorted(r.path for r in refs)
    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return ray.remote(FileServer).options(
        name=f"tune_age_files_{key}", get_if_exists=True, num_cpus=0, max_concurrency=IN_FLIGHT * 2,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=refs[0].node, soft=False),
    ).remote(paths)


def hand_over(data, mode: str, capacity: float, node: str) -> str:
    """How a search's trials get `data`'s images, for `--memory-map` `mode` (auto, on, off)
    and the object store's `capacity` on the driver's node: by file (sets data.mapped) or
    through the object store (plain arrays, which Ray copies into it). What was chosen, why."""
    size = sum(a.nbytes for a in data.images.values())
    refs = {s: reference(a, node) for s, a in data.images.items()}
    share = f"{size / 2**20:,.0f} MiB of images, object store {capacity / 2**20:,.0f} MiB"
    wanted = mode == "on" or (mode == "auto" and size > AUTO_SHARE * capacity)
    if wanted and any(r is None for r in refs.values()):
        why = ("the decoded images are not all in a decode-cache file (the cache folder could not "
               "be written: see the warning above)")
        if mode == "on":
            raise ConfigError(f"--memory-map on: {why}; fix the cache folder or use --memory-map off")
        log.warning("%s: the images go into the object store (%s)", why, share)
        wanted = False
    if not wanted:
        data.images, data.mapped = {s: np.asarray(a) for s, a in data.images.items()}, {}
        return f"in Ray's object store ({share})"
    data.mapped = refs
    return f"memory-mapped from the decode cache ({share}; --memory-map {mode})"


def store_capacity() -> float:
    """Bytes of object store on the node this process runs on (Ray started)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            return float(node.get("Resources", {}).get("object_store_memory", 0.0))
    return float(ray.cluster_resources().get("object_store_memory", 0.0))
