"""Decoding image files once into one uint8 array (N x 3 x S x S), with an on-disk cache.

Every image is opened with PIL, rotated by its EXIF orientation, converted to RGB from
whatever mode it has (grayscale, alpha, palette, CMYK, 16-bit), then made square (center
crop, or black padding) and resized to S x S by `preprocess.square_resize`, which exported
models run too. Files that cannot be decoded (truncated, empty,
not an image) are skipped and reported, never fatal. Decoding runs on a thread pool
(PIL releases the GIL while decoding and resizing).

    images, kept, skipped = decode_images(paths, 64)   # images[j] comes from paths[kept[j]]
    native_size(paths)                                 # 200 if every image is 200 x 200

The result is the cache: `<cache root>/decoded/<key>.npy` (cache root: $TUNE_AGE_CACHE or
~/.cache/tune_age), one uint8 array written row by row as the images decode, with its
manifest `<key>.json` (rows kept, files skipped and why), keyed by every file's path, size
and mtime, the image size, the square mode and DECODE_VERSION. The array comes back
memory-mapped (read-only): a second call with unchanged files maps it instead of decoding,
processes that map it share its pages through the page cache, and a data set larger than
memory decodes and trains without ever being in memory whole (data/mapped.py). Where the
cache cannot be written, the images are decoded into memory, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from ..errors import ConfigError
from .preprocess import SQUARE_MODES, square_resize

log = logging.getLogger(__name__)

# Bump whenever decoding changes what pixels come out, to retire old caches. 2: the square
# crop or pad and the resize are preprocess.square_resize, the one definition exports use too.
DECODE_VERSION = 2


def cache_root() -> Path:
    """Where tune_age keeps caches: $TUNE_AGE_CACHE, or ~/.cache/tune_age."""
    return Path(os.environ.get("TUNE_AGE_CACHE") or "~/.cache/tune_age").expanduser()


def file_stamps(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(path, size in bytes, mtime in ns) per file; (path, -1, -1) for one that cannot be read."""
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
            stamps.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((str(path), -1, -1))
    return stamps


# --- one image -----------------------------------------------------------------------------


def decode_one(path: str, size: int, square: str = "crop") -> np.ndarray:
    """One file as a uint8 array 3 x size x size; raises if the file is not a readable image."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as im:
        im.load()  # decode now, so that a truncated file fails here and not halfway through
        im = _to_rgb(ImageOps.exif_transpose(im))
        pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    return square_resize(pixels, size, square)[0].to(torch.uint8).numpy()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # Pillow's own conversion clips 16-bit values at 255 (an all-white face); scale instead.
        return Image.fromarray(_to_8bit(np.asarray(im), im.mode)).convert("RGB")
    if im.mode in ("P", "PA") and (im.mode == "PA" or "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        # Composite on black: the colour under fully transparent pixels is arbitrary.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scales a 16/32-bit integer or float image to 0-255 by its format's range."""
    values = arr.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16"):
        full = 65535.0
    elif mode == "F":
        full = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
    else:  # "I": 32-bit container, usually 16-bit PNG/TIFF data, sometimes 8-bit data
        full = 255.0 if top <= 255.0 else 65535.0 if top <= 65535.0 else top
    return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)


# --- native size ---------------------------------------------------------------------------


def _header_size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception:  # an unreadable file is reported by decode_images, not here
        return None


def header_sizes(paths: Sequence[str], workers: int | None = None) -> Counter:
    """How many readable images have each (width, height), read from the headers only.

    EXIF orientation is not applied: it cannot make a square image non-square, and applying
    it would mean decoding PNGs whose EXIF block comes after the pixels.
    """
    with ThreadPoolExecutor(_workers(workers, len(paths))) as pool:
        sizes = pool.map(_header_size, paths)
        return Counter(s for s in sizes if s is not None)


def native_size(paths: Sequence[str]) -> int | None:
    """S if every readable image is S x S, else None (mixed sizes, non-square, or none readable)."""
    return square_size(header_sizes(paths))


def square_size(sizes: Counter) -> int | None:
    """S if the only (width, height) counted is (S, S), else None."""
    if len(sizes) == 1:
        ((w, h),) = sizes
        if w == h:
            return w
    return None


def describe_sizes(sizes: Counter, show: int = 4) -> str:
    common = sizes.most_common()
    text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in common[:show])
    return text + (f" and {len(common) - show} more" if len(common) > show else "")


# --- many images, cached -------------------------------------------------------------------


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        affinity = getattr(os, "sched_getaffinity", None)  # the cores this process may use
        workers = len(affinity(0)) if affinity else os.cpu_count()
    return max(1, min(workers or 1, max(n, 1)))


def cache_key(paths: Sequence[str], image_size: int, square: str) -> str:
    blob = json.dumps([DECODE_VERSION, image_size, square, file_stamps(paths)])
    return hashlib.sha256(blob.encode()).hexdigest()


def decode_images(
    paths: list[str],
    image_size: int,
    square: str = "crop",
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(images uint8 N_kept x 3 x S x S, kept int64 indices into paths, skipped (path, reason)).
    The images are the cache file's first N_kept rows, memory-mapped read-only, unless the
    cache could not be written (then an array in memory)."""
    if square not in SQUARE_MODES:
        raise ConfigError(
            f"square={square!r} is not valid; choose one of {', '.join(SQUARE_MODES)}"
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r} is not valid; use a positive pixel count")
    paths = [str(p) for p in paths]
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "decoded"
    cache_file = cache_dir / f"{cache_key(paths, image_size, square)}.npy"
    cached = _load_cache(cache_file, len(paths), image_size)
    if cached is not None:
        log.info("%d images at %dpx mapped from cache %s", len(cached[1]), image_size, cache_file)
        return cached

    n, size = len(paths), image_size
    out, tmp = _new_cache(cache_file, (n, 3, size, size))
    reasons: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = decode_one(paths[i], size, square)  # looked up at call time: testable
        except Exception as exc:  # untrusted files: any failure skips that file alone
            why = str(exc).replace(f" {paths[i]!r}", "")  # the path is reported beside it
            reasons[i] = why if isinstance(exc, ValueError) else f"{type(exc).__name__}: {why}"

    # tqdm's disable=None hides the bar when stderr is not a terminal (Ray workers, CI logs).
    # The pool's threads run one resize each: torch's own threads would only compete with them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _restore_threads(threads), ThreadPoolExecutor(_workers(workers, n)) as pool, tqdm(
            total=n, desc=f"decoding {size}px", unit="img", file=sys.stderr,
            disable=None if progress else True, leave=False,
        ) as bar:
            for future in as_completed([pool.submit(work, i) for i in range(n)]):
                future.result()
                bar.update()
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise

    kept = np.array([i for i in range(n) if i not in reasons], dtype=np.int64)
    if reasons:  # move kept rows up in place, rather than copying the whole array
        for j, i in enumerate(kept):
            if i != j:
                out[j] = out[i]
    skipped = [(paths[i], reasons[i]) for i in sorted(reasons)]
    log.info("decoded %d images at %dpx, %d skipped", len(kept), size, len(skipped))
    if tmp is None:  # no cache: the array in memory
        return out[: len(kept)], kept, skipped
    out.flush()  # the mapping closes with this call; the file is whole now
    return _commit_cache(cache_file, tmp, kept, skipped)


def _new_cache(file: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, Path | None]:
    """A writable memory-mapped .npy beside `file` to decode into, and its temporary path;
    an array in memory and None where the cache folder cannot be written."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".npy")
        os.close(fd)
        tmp = Path(name)
        try:
            return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape), tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only or full disk costs speed next time, not this run
        log.warning("could not write decode cache %s (%s): decoding into memory", file, exc)
        return np.empty(shape, dtype=np.uint8), None


def _commit_cache(file: Path, tmp: Path, kept: np.ndarray, skipped: list):
    """Renames the decoded array into place, then writes its manifest (what marks the entry
    complete), and maps it."""
    rows = len(kept)
    try:
        os.replace(tmp, file)
    except OSError as exc:
        log.warning("could not write decode cache %s: %s", file, exc)
        images = np.array(np.load(tmp, mmap_mode="r")[:rows])
        tmp.unlink(missing_ok=True)
        return images, kept, skipped
    try:
        _write_manifest(file.with_suffix(".json"),
                        {"rows": rows, "kept": kept.tolist(), "skipped": [list(s) for s in skipped]})
    except OSError as exc:  # the array is whole: this run maps it, the next decodes again
        log.warning("could not write decode cache manifest %s: %s", file.with_suffix(".json"), exc)
    return np.load(file, mmap_mode="r")[:rows], kept, skipped


def _write_manifest(file: Path, manifest: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=file.parent, prefix=f".{file.stem}.", suffix=".json",
                                     delete=False) as handle:
        json.dump(manifest, handle)
    os.replace(handle.name, file)


@contextlib.contextmanager
def _restore_threads(threads: int):
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_cache(file: Path, n: int, size: int):
    """(images mapped read-only, kept, skipped) from a complete cache entry, or None."""
    manifest = file.with_suffix(".json")
    if not (file.is_file() and manifest.is_file()):
        return None
    try:
        info = json.loads(manifest.read_text())
        rows, kept = int(info["rows"]), np.array(info["kept"], dtype=np.int64)
        skipped = [(str(p), str(r)) for p, r in info["skipped"]]
        images = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # a damaged cache is only a lost shortcut
        log.warning("ignoring unreadable decode cache %s: %s", file, exc)
        return None
    if (images.dtype != np.uint8 or images.shape[1:] != (3, size, size) or len(images) < rows
            or len(kept) != rows or rows + len(skipped) != n):
        log.warning("ignoring decode cache %s: its shape does not match the inputs", file)
        return None
    return images[:rows], kept, skipped
