"""From a path on disk to one manifest table: `path` (absolute), `age` (NaN if unknown), `group`.

Three layouts are understood; with fmt="auto" the layout is detected from the path:

- utkface: a folder (searched recursively) of files named `age_gender_race_date.jpg.chip.jpg`
  (or any image extension); only the leading age is used. Names that do not parse are
  reported in the returned skipped list and logged, never dropped silently.
- folders: one sub-folder per age group, `root/20-29/*.jpg`, like torchvision's ImageFolder.
- csv: a `.csv` file with columns `path,age` or `path,age_group` (alias `group`), paths
  relative to the CSV's folder and confined to it.

    groups = make_groups("decades")
    table, skipped = read_manifest("~/data/UTKFace", "auto", groups)

After this module, no code knows where the data came from.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .groups import MAX_AGE, AgeGroups

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_UTK_NAME = re.compile(r"^(\d+)_")  # the age is the integer before the first "_"
_SHOW = 5  # how many example names an error or warning lists

Skipped = list[tuple[str, str]]

LAYOUTS_HELP = (
    "expected one of three layouts: utkface (a folder of images named age_gender_race_date.jpg), "
    "folders (one sub-folder per age group, such as 20-29/), or csv (a .csv file with columns "
    "path,age or path,age_group); pass --layout utkface|folders|csv to choose one"
)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted; hidden folders (.git, .cache) are skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder, f) for f in sorted(files) if is_image(f))
    return found


def _subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_group(name: str, groups: AgeGroups) -> bool:
    try:
        groups.index_of_name(name)
    except ConfigError:
        return False
    return True


def _examples(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _check_folder(root: Path) -> list[Path]:
    """The images under a folder; a DataError for a missing, empty or image-less folder."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if not any(root.iterdir()):
        raise DataError(f"{root}: the folder is empty; {LAYOUTS_HELP}")
    images = list_images(root)
    if not images:
        raise DataError(
            f"{root}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            "in sub-folders too)"
        )
    return images


def _table(paths: list[str], ages: list[float], labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": pd.Series(paths, dtype=object),
            "age": np.asarray(ages, dtype=np.float64),
            "group": np.asarray(labels, dtype=np.int64),
        }
    )


# --- readers: each takes the path and the groups and returns (table, skipped) ---------------


def read_utkface(root: Path, groups: AgeGroups) -> tuple[pd.DataFrame, Skipped]:
    root = root.resolve()
    paths, ages, labels, skipped = [], [], [], []
    for file in _check_folder(root):
        match = _UTK_NAME.match(file.name)
        if not match:
            skipped.append((str(file), "name does not start with age_ (UTKFace naming)"))
            continue
        age = int(match.group(1))
        if age > MAX_AGE:
            skipped.append((str(file), f"age {age} in the name is over {MAX_AGE}"))
            continue
        paths.append(str(file))
        ages.append(float(age))
        labels.append(groups.index_of_age(age))
    if skipped:
        log.warning(
            "%s: skipped %d of %d files whose names are not UTKFace age_gender_race_date names "
            "(first: %s)",
            root, len(skipped), len(skipped) + len(paths),
            _examples([Path(p).name for p, _ in skipped]),
        )
    if not paths:
        raise DataError(
            f"{root}: no file name starts with an age and '_' as UTKFace names do "
            f"(for example 25_0_1_20170116174525125.jpg); {LAYOUTS_HELP}"
        )
    return _table(paths, ages, labels), skipped


def read_folders(root: Path, groups: AgeGroups) -> tuple[pd.DataFrame, Skipped]:
    root = root.resolve()
    images = _check_folder(root)
    label_of: dict[str, int] = {}
    for name in _subfolders(root):
        try:
            label_of[name] = groups.index_of_name(name)
        except ConfigError as exc:
            raise DataError(f"{root / name}: folder name is not an age group: {exc}") from None
    if not label_of:
        raise DataError(f"{root}: no sub-folders; the folders layout needs one per age group")
    paths, labels, skipped = [], [], []
    for file in images:
        top = file.relative_to(root).parts[0]
        if top not in label_of:  # an image lying in root itself, outside any group folder
            skipped.append((str(file), "not inside an age-group folder"))
            continue
        paths.append(str(file))
        labels.append(label_of[top])
    if skipped:
        log.warning(
            "%s: skipped %d images outside the age-group folders (first: %s)",
            root, len(skipped), _examples([Path(p).name for p, _ in skipped]),
        )
    return _table(paths, [math.nan] * len(paths), labels), skipped


def read_csv(file: Path, groups: AgeGroups) -> tuple[pd.DataFrame, Skipped]:
    if not file.is_file():
        raise DataError(f"{file}: the csv format needs a .csv file")
    base = file.parent.resolve()
    # The csv module (not pandas) so that errors can name the exact line, blank lines included.
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or not {"age", "age_group", "group"} & set(header):
            raise DataError(
                f"{file}: line 1: columns {', '.join(header) or '(none)'}; need path and "
                "age (years) or age_group (a group name; alias group)"
            )
        col = {name: header.index(name) for name in header}
        group_col = col.get("age_group", col.get("group"))
        paths, ages, labels, missing = [], [], [], []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            cells = row + [""] * (len(header) - len(row))
            age = _parse_age(file, line, cells[col["age"]]) if "age" in col else math.nan
            if group_col is not None:  # an explicit group wins over the age
                label = _parse_group(file, line, cells[group_col], groups)
            else:
                label = groups.index_of_age(age)
            path = _confine(file, line, base, cells[col["path"]].strip())
            if not path.exists():
                missing.append(f"line {line}: {cells[col['path']].strip()}")
            paths.append(str(path))
            ages.append(age)
            labels.append(label)
    if missing:
        raise DataError(
            f"{file}: {len(missing)} path(s) do not exist (first: {missing[0]}); "
            f"paths are relative to {base}"
        )
    if not paths:
        raise DataError(f"{file}: no rows below the header")
    return _table(paths, ages, labels), []


def _parse_age(file: Path, line: int, raw: str) -> float:
    try:
        age = float(raw)
    except ValueError:
        age = math.nan
    if not math.isfinite(age) or not 0 <= age <= MAX_AGE:
        raise DataError(
            f"{file}: line {line}: age {raw.strip()!r} is not valid; use a number of years "
            f"from 0 to {MAX_AGE}"
        )
    return age


def _parse_group(file: Path, line: int, raw: str, groups: AgeGroups) -> int:
    try:
        return groups.index_of_name(raw)
    except ConfigError as exc:
        raise DataError(f"{file}: line {line}: {exc}") from None


def _confine(file: Path, line: int, base: Path, raw: str) -> Path:
    """The resolved path, confined to the CSV's folder (no .., absolute or symlink escape)."""
    if not raw:
        raise DataError(f"{file}: line {line}: the path is empty")
    path = (base / raw).resolve()  # an absolute raw replaces base; resolve follows symlinks
    if not path.is_relative_to(base):
        raise DataError(
            f"{file}: line {line}: path {raw!r} resolves outside the CSV's folder {base}; "
            "paths must be relative to it and stay inside it"
        )
    return path


READERS: dict[str, Callable[[Path, AgeGroups], tuple[pd.DataFrame, Skipped]]] = {
    "utkface": read_utkface,
    "folders": read_folders,
    "csv": read_csv,
}


# UTKFace's names: age_gender_race_date, gender 0 male / 1 female, race 0-4 as below.
UTK_GENDER = {"0": "male", "1": "female"}
UTK_RACE = {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Others"}
ATTRIBUTES = ("gender", "race")


def read_attributes(paths: list[str], source: Path, fmt: str) -> pd.DataFrame:
    """Who is in each photo, where the data says: `gender` and `race` per path ("" when
    unknown), from a CSV's columns of those names or from UTKFace names. For reports of
    accuracy by group of people; training never reads them."""
    out = pd.DataFrame({name: [""] * len(paths) for name in ATTRIBUTES})
    if fmt == "csv":
        with open(source, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        base = source.parent.resolve()
        by_path = {str((base / r.get("path", "").strip()).resolve()): r for r in rows}
        for name in ATTRIBUTES:
            out[name] = [str((by_path.get(str(Path(p).resolve())) or {}).get(name, "") or "").strip()
                         for p in paths]
    elif fmt == "utkface":
        for i, p in enumerate(paths):
            parts = Path(p).name.split("_")
            if len(parts) >= 3:
                out.loc[i, "gender"] = UTK_GENDER.get(parts[1], "")
                out.loc[i, "race"] = UTK_RACE.get(parts[2], "")
    return out


def detect_format(path: str | Path, groups: AgeGroups) -> str:
    """The layout of `path`: "csv", "folders" or "utkface", or a DataError explaining them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"{path}: a file but not a .csv; {LAYOUTS_HELP}")
    images = _check_folder(path)
    subfolders = _subfolders(path)
    not_groups = [name for name in subfolders if not _is_group(name, groups)]
    if subfolders and not not_groups:
        return "folders"
    utk_names = sum(bool(_UTK_NAME.match(f.name)) for f in images)
    if utk_names * 2 >= len(images):  # most names look like UTKFace's: stray files get reported
        return "utkface"
    hint = ""
    if not_groups:
        hint = (
            f"; sub-folders {_examples(not_groups)} are not age groups of bins "
            f"{groups.spec!r} (valid: {', '.join(groups.names)})"
        )
    raise DataError(f"{path}: cannot tell the layout{hint}; {LAYOUTS_HELP}")


def require_two_groups(labels: np.ndarray, groups: AgeGroups, where: str) -> None:
    present = np.unique(labels)
    if len(labels) == 0:
        raise DataError(f"{where}: no images left")
    if len(present) < 2:
        names = ", ".join(groups.names[i] for i in present) or "none"
        raise DataError(
            f"{where}: only one age group ({names}) among {len(labels)} images, need at least two"
        )


def read_manifest(
    path: str | Path, fmt: str, groups: AgeGroups
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """One table (path, age, group) and the (name, reason) list of entries that were skipped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if fmt == "auto":
        fmt = detect_format(path, groups)
    if fmt not in READERS:
        raise DataError(f"format {fmt!r} is not known; choose one of auto, {', '.join(READERS)}")
    if fmt != "csv" and not path.is_dir():
        raise DataError(f"{path}: the {fmt} format needs a folder")
    table, skipped = READERS[fmt](path, groups)
    require_two_groups(table["group"].to_numpy(), groups, str(path))
    log.info("%s: %d images as %s, %d skipped", path, len(table), fmt, len(skipped))
    return table, skipped
