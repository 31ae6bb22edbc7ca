"""Using a model: age groups of images (`predict`), metrics on a labelled set (`evaluate`).

Both take an export (`tune-age export`) or a `tune-age train` checkpoint, and decode
images exactly as training did (data.decode: EXIF rotation, RGB, square crop, resized
to the model's size, kept in the same decode cache), so a model sees the same pixels
here as in the search.

    rows, skipped = predict("best.pt", ["face.jpg", "photos/"], top=3)
    metrics = evaluate("best.pt", "~/data/UTKFace")   # accuracy, one_off, macro_f1, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import image_keys
from ..data.decode import decode_images
from ..data.sources import list_images, read_manifest
from ..training.engine import evaluate as engine_evaluate
from ..training.engine import predict_logits
from ..errors import ConfigError, DataError
from .export import LoadedModel, load_model
from ..training import as_tensor


METRIC_KEYS = ("accuracy", "one_off", "macro_f1", "balanced_accuracy", "mae")


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly, and those in folders (recursively, hidden ones skipped)."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise DataError(f"{path}: no image files in this folder (or its sub-folders)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def describe_skipped(skipped: list[tuple[str, str]], show: int = 3) -> str:
    """The first few (path, reason) pairs as "name: reason; ..." for a one-line message."""
    return "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:show])


def probabilities(loaded: LoadedModel, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Softmax over the age groups for uint8 images N x 3 x S x S at the model's size."""
    x = as_tensor(np.asarray(images))
    logits = predict_logits(loaded.model, x, norm=loaded.normalizer(), batch_size=batch_size)
    return torch.softmax(logits.float() / loaded.temperature, dim=1).cpu()


def _ready(model: str | Path | LoadedModel, top: int, device: str) -> LoadedModel:
    if top < 1:
        raise ConfigError(f"--top {top} is not valid; give 1 or more")
    return model if isinstance(model, LoadedModel) else load_model(model, device)


def _ranked(loaded: LoadedModel, images: np.ndarray | torch.Tensor, top: int) -> list[dict[str, Any]]:
    """Per image: its most likely group, that group's probability and the `top` groups."""
    values, indices = probabilities(loaded, images).topk(min(top, len(loaded.groups)), dim=1)
    names = loaded.groups.names
    return [{"group": names[idx[0]], "probability": vals[0],
             "top": [{"group": names[i], "probability": v} for i, v in zip(idx, vals)]}
            for vals, idx in zip(values.tolist(), indices.tolist())]


def predict(
    model: str | Path | LoadedModel,
    inputs: list[str | Path],
    top: int = 3,
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One row per readable image: path, group, probability and the `top` groups with theirs;
    plus the (path, reason) of images that could not be read."""
    loaded = _ready(model, top, device)
    files = image_files(inputs)
    images, kept, skipped = decode_images([str(f) for f in files], loaded.image_size, loaded.square,
                                          progress=False)
    if len(kept) == 0:
        raise DataError(f"none of the {len(files)} files could be read as an image "
                        f"(first: {describe_skipped(skipped)})")
    rows = [{"path": str(files[row]), **ranked} for row, ranked in zip(kept, _ranked(loaded, images, top))]
    return rows, skipped


def predict_faces(
    model: str | Path | LoadedModel,
    inputs: list[str | Path],
    top: int = 3,
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Like `predict`, on the faces found in each photo (data/faces.py): one row per face with
    its number in the photo (largest first), box and landmarks; a photo with no face, or that
    cannot be read, is skipped with its reason."""
    from ..data.faces import FaceAligner, read_rgb
    from ..data.preprocess import square_resize

    loaded = _ready(model, top, device)
    aligner = FaceAligner()
    found, skipped = [], []
    for file in image_files(inputs):
        try:
            faces = aligner.faces(read_rgb(file))
        except (OSError, ValueError) as exc:
            skipped.append((str(file), f"unreadable: {exc}"))
            continue
        if not faces:
            skipped.append((str(file), "no face found"))
        found += [(file, i, face) for i, face in enumerate(faces, 1)]
    if not found:
        raise DataError(f"no face found in any of the photos (first: {describe_skipped(skipped)})")
    chips = torch.from_numpy(np.stack([face.chip for _, _, face in found])).permute(0, 3, 1, 2)
    images = square_resize(chips, loaded.image_size, loaded.square).to(torch.uint8)  # as decoding does
    rows = [{"path": str(file), "face": number, "box": face.box, "landmarks": face.landmarks, **ranked}
            for (file, number, face), ranked in zip(found, _ranked(loaded, images, top))]
    return rows, skipped


def prediction_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Flat columns for CSV: path, group, probability, group_1, probability_1, ..."""
    flat = []
    for row in rows:
        item = {"path": row["path"], "group": row["group"], "probability": row["probability"]}
        if "face" in row:
            item = {"path": row["path"], "face": row["face"], "box": " ".join(map(str, row["box"])),
                    "group": row["group"], "probability": row["probability"]}
        for i, t in enumerate(row["top"], 1):
            item[f"group_{i}"], item[f"probability_{i}"] = t["group"], t["probability"]
        flat.append(item)
    return pd.DataFrame(flat)


def evaluate_arrays(
    loaded: LoadedModel,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    ages: np.ndarray | torch.Tensor | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """engine.evaluate on decoded images; `mae` only when some ages are known."""
    # Copies: pandas hands out read-only arrays, which torch warns about sharing.
    ages_t = None if ages is None else torch.tensor(np.array(ages, dtype=np.float32))
    result = engine_evaluate(
        loaded.model, as_tensor(np.asarray(images)), torch.tensor(np.array(labels, dtype=np.int64)),
        norm=loaded.normalizer(), num_classes=len(loaded.groups), ages=ages_t,
        centers=loaded.groups.centers, batch_size=batch_size,
    )
    out = {k: result[k] for k in METRIC_KEYS if result.get(k) is not None}
    out["confusion"] = result["confusion"]
    out["loss"] = result["loss"]
    out["n_images"] = int(len(labels))
    out["groups"] = loaded.groups.names
    out["pred"] = result["pred"].numpy()  # each image's predicted group, for intervals
    return out


def evaluate(
    model: str | Path | LoadedModel,
    data: str | Path,
    layout: str = "auto",
    device: str = "cpu",
    include_seen: bool = False,
    by: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics of the model on a labelled set in any supported layout (utkface, folders, csv),
    labelled with the model's own age groups. Images the model saw in training or validation
    (its file records their pixel keys) are counted and, unless `include_seen`, left out:
    scoring them would flatter the model. Keys: accuracy, one_off, macro_f1, balanced_accuracy,
    mae (years; when ages are known), confusion (rows: true group), loss, n_images, seen,
    scored ("unseen" or "all"), groups, skipped; with `by` (gender, race, age_group), `by_group`:
    for each, per value: n, accuracy, one_off, mae and 95 % Wilson intervals, and the gap."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    table, skipped = read_manifest(Path(data), layout, loaded.groups)
    images, kept, failed = decode_images(table["path"].tolist(), loaded.image_size, loaded.square)
    if len(kept) == 0:
        raise DataError(f"{data}: none of the {len(table)} images could be decoded "
                        f"(first: {describe_skipped(failed)})")
    table = table.iloc[kept]
    seen = np.zeros(len(table), dtype=bool)
    if loaded.seen is not None:
        seen = np.isin(image_keys(images), np.fromiter(loaded.seen, dtype=np.int64))
    if seen.all() and not include_seen:
        raise DataError(f"{data}: all {len(table)} images were seen by the model in training or "
                        "validation, so no unseen image is left to score; add --include-seen to "
                        "score them anyway (the figure will flatter the model)")
    if not include_seen and seen.any():
        images, table = images[~seen], table[~seen]
    ages = table["age"].to_numpy(np.float32)
    labels = table["group"].to_numpy(np.int64)
    metrics = evaluate_arrays(loaded, images, labels, None if np.isnan(ages).all() else ages)
    pred = metrics.pop("pred")
    if by:
        metrics["by_group"] = by_group(loaded, table, pred, labels, ages, Path(data), layout, by)
    metrics["skipped"] = len(skipped) + len(failed)
    metrics["seen"] = int(seen.sum()) if loaded.seen is not None else None
    metrics["scored"] = "all" if include_seen else "unseen"
    return metrics


BY = ("gender", "race", "age_group")
MIN_GAP_IMAGES = 10  # a subgroup smaller than this is shown but not used for the largest gap


def by_group(loaded: LoadedModel, table: pd.DataFrame, pred: np.ndarray, labels: np.ndarray,
             ages: np.ndarray, data: Path, layout: str, by: list[str]) -> dict[str, Any]:
    """group_accuracy of the images in `table` (read from `data`), for evaluate --by."""
    from ..data.sources import detect_format, read_attributes

    unknown = [b for b in by if b not in BY]
    if unknown:
        raise ConfigError(f"--by {','.join(by)}: {unknown[0]!r} is not known; choose from {', '.join(BY)}")
    fmt = detect_format(data, loaded.groups) if layout == "auto" else layout
    people = read_attributes(table["path"].tolist(), data, fmt)
    return group_accuracy(people, by, loaded.groups, pred, labels, ages, str(data))


def group_accuracy(people: pd.DataFrame, by: list[str], groups, pred: np.ndarray, labels: np.ndarray,
                   ages: np.ndarray, where: str) -> dict[str, Any]:
    """Accuracy, one-off accuracy and MAE per value of each attribute in `by` (columns of
    `people`, one row per image, "" when unknown; or "age_group"), with counts and Wilson
    intervals, and the largest accuracy gap between values with at least MIN_GAP_IMAGES."""
    from .intervals import wilson

    centers = np.asarray(groups.centers)
    out = {}
    for name in by:
        values = (np.asarray(groups.names)[labels] if name == "age_group" else people[name].to_numpy())
        if name != "age_group" and not any(values):
            raise DataError(f"{where}: no {name} is known for these images (a CSV column {name!r}, or "
                            "UTKFace names age_gender_race_date, carry it)")
        rows = {}
        present = set(values) - {""}
        for value in ([n for n in groups.names if n in present] if name == "age_group" else sorted(present, key=str)):
            mask = values == value
            n = int(mask.sum())
            acc = float((pred[mask] == labels[mask]).mean())
            one_off = float((np.abs(pred[mask] - labels[mask]) <= 1).mean())
            known = mask & ~np.isnan(ages)
            mae = float(np.abs(centers[pred[known]] - ages[known]).mean()) if known.any() else None
            rows[str(value)] = {"n": n, "accuracy": acc, "accuracy_ci": list(wilson(acc, n)),
                                "one_off": one_off, "one_off_ci": list(wilson(one_off, n)), "mae": mae}
        big = {k: r for k, r in rows.items() if r["n"] >= MIN_GAP_IMAGES}
        gap = None
        if len(big) >= 2:
            ordered = sorted(big, key=lambda k: big[k]["accuracy"])
            lo, hi = ordered[0], ordered[-1]
            gap = {"highest": hi, "lowest": lo, "accuracy_gap": big[hi]["accuracy"] - big[lo]["accuracy"],
                   "beyond_intervals": big[hi]["accuracy_ci"][0] > big[lo]["accuracy_ci"][1]}
        out[name] = {"values": rows, "largest_gap": gap, "unknown": int((values == "").sum())}
    return out


def by_group_lines(by: dict[str, Any]) -> list[str]:
    lines = []
    for name, part in by.items():
        lines.append(f"by {name}" + (f" ({part['unknown']} image(s) unknown)" if part["unknown"] else "") + ":")
        for value, r in part["values"].items():
            mae = f", mae {r['mae']:.1f} years" if r["mae"] is not None else ""
            lines.append(f"  {value:<16} n={r['n']:<5} accuracy {r['accuracy']:.3f} "
                         f"[{r['accuracy_ci'][0]:.3f}-{r['accuracy_ci'][1]:.3f}], one_off {r['one_off']:.3f}{mae}")
        gap = part["largest_gap"]
        if gap:
            sure = "beyond both intervals" if gap["beyond_intervals"] else "within the intervals: it may be noise"
            lines.append(f"  largest gap: {gap['accuracy_gap']:.3f} ({gap['highest']} over {gap['lowest']}; "
                         f"groups of {MIN_GAP_IMAGES}+ images), {sure}")
    return lines


def metric_lines(metrics: dict[str, Any]) -> list[str]:
    """The metrics and the confusion matrix as aligned text."""
    lines = [f"{metrics['n_images']} images scored"
             + (f" ({metrics['skipped']} skipped)" if metrics.get("skipped") else "")]
    if metrics.get("seen") is None and "seen" in metrics:
        lines.append("the model file does not record its training images, so none could be left out")
    elif metrics.get("seen"):
        lines.append(f"{metrics['seen']} image(s) the model saw in training or validation "
                     + ("are scored too (--include-seen)" if metrics.get("scored") == "all"
                        else "left out (--include-seen scores them too)"))
    for key in METRIC_KEYS:
        if key in metrics:
            unit = " years" if key == "mae" else ""
            lines.append(f"{key:<18} {metrics[key]:.4f}{unit}")
    names = metrics["groups"]
    width = max(6, *(len(n) for n in names), *(len(str(c)) for r in metrics["confusion"] for c in r))
    lines.append("confusion (rows: true group, columns: predicted)")
    lines.append(" " * width + " " + " ".join(n.rjust(width) for n in names))
    for name, row in zip(names, metrics["confusion"]):
        lines.append(name.rjust(width) + " " + " ".join(str(c).rjust(width) for c in row))
    if metrics.get("by_group"):
        lines += by_group_lines(metrics["by_group"])
    return lines
