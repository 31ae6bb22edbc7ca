"""The best model of a search as one file, and loading models back safely.

    ref = best_checkpoint(load_experiment(exp_dir))       # best epoch of any trial
    result = export_best(exp_dir, "best.pt")                # weights + everything to use them
    loaded = load_model("best.pt")                          # an export or a `tune-age train` checkpoint
    probs = loaded.model(loaded.normalizer()(uint8_images)).softmax(1)

The export is chosen over every checkpoint that Ray kept (the best ones of each trial),
by the metric each checkpoint stores about its own epoch, so the winner is the best
epoch of any trial, not the last epoch of the best trial. The file is a plain dict
(tensors, numbers, strings) that loads with `torch.load(weights_only=True)`:

    format, version, model (state_dict), config (TrainConfig), groups (names, edges),
    norm (mean, std), image_size, square, metrics, history, provenance, sha256

`sha256` covers everything else in the file (tensors by dtype, shape and bytes), so an
edited or damaged export is refused. It is written to a temporary file and renamed
into place, and never replaces an existing file unless asked to. `--pt2` adds
`<name>.pt2`, a torch.export program of the network with its preprocessing (uint8 RGB
N x 3 x H x W in, any N, H and W, made square and resized by the same
`preprocess.square_resize` that training's decoding uses, probabilities out), which needs
only torch: `torch.export.load(path).module()(images)`; `--onnx` the same as ONNX. Both
check themselves against PyTorch before they are written (see `_check_program`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import METRICS, TrainConfig
from ..data.groups import AgeGroups, groups_from_dict
from ..data.preprocess import square_resize
from ..training.engine import Normalizer, predict_logits, resolve_device
from ..errors import ArtifactError, ConfigError, TuneAgeError
from ..models import BACKBONES, build_model
from . import FAILED, MEASURES, Experiment, is_baseline, load_experiment, pick_trials, status_counts
from ..training import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_atomic
from ..training.selection import selection_score

log = logging.getLogger(__name__)

EXPORT_FORMAT = "tune_age.export"
EXPORT_VERSION = 1
CHECKPOINT_GLOB = "checkpoint_*/checkpoint.pt"
FORMATS = {EXPORT_FORMAT: EXPORT_VERSION, CHECKPOINT_FORMAT: CHECKPOINT_VERSION}
REQUIRED = ("model", "config", "groups", "norm", "image_size")


# --- choosing the checkpoint -----------------------------------------------------------------


@dataclass
class CheckpointRef:
    """One checkpoint Ray kept, with the metrics it stores about its own epoch."""

    path: Path
    trial_id: str
    epoch: int
    metrics: dict[str, Any]
    baseline: bool = False
    image_size: int | None = None

    def value(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def list_checkpoints(exp: Experiment) -> list[CheckpointRef]:
    """Every readable checkpoint of every trial folder, in folder and epoch order."""
    by_dir = {t.get("dir"): t for t in exp.trials.values() if t.get("dir")}
    return [ref for folder in sorted({f.parent.parent for f in exp.path.glob(f"*/{CHECKPOINT_GLOB}")})
            for ref in trial_checkpoints(folder, by_dir.get(folder.name, {}))]


def trial_checkpoints(folder: Path, entry: dict[str, Any] | None = None) -> list[CheckpointRef]:
    """The readable checkpoints of one trial folder, in epoch order; `entry` its trial-log entry."""
    entry = entry or {}
    refs = []
    for file in sorted(folder.glob(CHECKPOINT_GLOB)):
        try:
            # mmap: only the small metadata is read, not the weights.
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a checkpoint Ray was writing, or a damaged one
            log.warning("skipping unreadable checkpoint %s: %s", file, type(exc).__name__)
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            continue
        refs.append(CheckpointRef(
            path=file,
            trial_id=entry.get("trial_id", folder.name.removeprefix("trial_")),
            epoch=int(state.get("epoch", 0)),
            metrics=dict(state.get("metrics") or {}),
            baseline=is_baseline(entry),
            image_size=state.get("image_size"),
        ))
    return refs


def best_checkpoint(exp: Experiment, metric: str | None = None, among: set[str] | None = None) -> CheckpointRef:
    """The best model of a search: the checkpoint with the best `metric` (default: the
    search's) over all epochs kept of every trial that did not fail (errored and diverged
    trials are left out; the seed baseline counts), ties as training.selection decides.
    `tune-age export`, the report and the end-of-search summary all mean this one.
    `among`: only these trials (export --pick). Raises TuneAgeError when there is none."""
    metric = metric or exp.metric
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not valid; choose one of {', '.join(METRICS)}")
    failed = {t["trial_id"] for t in exp.trials.values() if t["status"] in FAILED}
    refs = [r for r in list_checkpoints(exp) if r.trial_id not in failed]
    best = best_of([r for r in refs if among is None or r.trial_id in among], metric)
    if best is None:
        raise TuneAgeError(
            f"{exp.path}: no completed trial has a checkpoint with a {metric} score "
            f"(trials: {status_counts(exp)}); nothing to export until a trial finishes an epoch"
        )
    return best


def best_of(refs: list[CheckpointRef], metric: str) -> CheckpointRef | None:
    """The checkpoint among `refs` that training.selection ranks first by `metric` (an exact
    tie goes to the later epoch); None when none of them stores that metric."""
    scored = [(selection_score({**r.metrics, "epoch": r.epoch}, metric), r.epoch, i)
              for i, r in enumerate(refs)]
    scored = [s for s in scored if s[0] is not None]
    return refs[max(scored)[2]] if scored else None


# --- hashing ---------------------------------------------------------------------------------


def payload_sha256(obj: Any) -> str:
    """A sha256 of nested dicts, lists, tensors and scalars that does not depend on how
    torch lays out the file: dict keys sorted, tensors hashed by dtype, shape and bytes."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"S{json.dumps(obj, default=repr)}|".encode())


# --- loading ---------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A network in eval mode with everything needed to feed it and to read its output."""

    model: nn.Module
    cfg: TrainConfig
    groups: AgeGroups
    mean: list[float]
    std: list[float]
    image_size: int
    square: str
    kind: str  # "export" or "checkpoint"
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    seen: set[int] | None = None  # image keys of its train and val images; None: not recorded
    temperature: float = 1.0  # logits are divided by it (export --calibrate); 1: as trained

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalizer(self) -> Normalizer:
        return Normalizer(self.mean, self.std, self.device)


def read_artifact(path: str | Path) -> dict[str, Any]:
    """The dict in a tune_age export or checkpoint, loaded with weights_only=True and checked.

    Refuses, with one line naming the file: a missing file, a file torch cannot read, a
    pickle that needs Python objects other than tensors and plain values (it is never run),
    a file that is not ours, and an export whose sha256 does not match its contents.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it asks for {found.group(1)}" if found else "it is not a PyTorch weights file"
        raise ArtifactError(
            f"{path}: refused: weights_only loading rejected it ({what}); a tune_age export or "
            "checkpoint holds only tensors and plain values, so nothing in this file was run"
        ) from None
    except Exception as exc:
        program = "TorchScript" in str(exc) or path.suffix == ".pt2"
        raise ArtifactError(
            f"{path}: this is a TorchScript file or torch.export program; load it with torch.jit.load or "
            "torch.export.load(path).module(), or give the .pt export"
            if program else
            f"{path}: not a tune_age export or checkpoint (torch cannot read it: "
            f"{type(exc).__name__}); it may be damaged or another kind of file"
        ) from None
    kind = state.get("format") if isinstance(state, dict) else None
    if kind not in FORMATS:
        raise ArtifactError(
            f"{path}: not a tune_age export or checkpoint (its format is {kind!r}, expected "
            f"{EXPORT_FORMAT!r} from `tune-age export` or {CHECKPOINT_FORMAT!r} from `tune-age train`)"
        )
    if not isinstance(state.get("version"), int) or state["version"] > FORMATS[kind]:
        raise ArtifactError(
            f"{path}: {kind} version {state.get('version')!r} is newer than this tune_age reads "
            f"({FORMATS[kind]}); upgrade tune_age"
        )
    if kind == EXPORT_FORMAT:
        body = {k: v for k, v in state.items() if k != "sha256"}
        if state.get("sha256") != payload_sha256(body):
            raise ArtifactError(
                f"{path}: sha256 mismatch: the export was changed after it was written "
                "(tampered with or damaged); refusing it; export the model again"
            )
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ArtifactError(f"{path}: {kind} without {', '.join(missing)}; it cannot be used")
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """An export (`tune-age export`) or a checkpoint (`tune-age train`, or a search trial's),
    rebuilt and loaded strictly, in eval mode on `device` ("auto": CUDA, MPS or CPU)."""
    path = Path(path).expanduser()
    state = read_artifact(path)
    try:
        cfg = TrainConfig.from_dict(state["config"])
        groups = groups_from_dict(state["groups"])
        # The weights come from the file: never download pretrained ones to build the network.
        model = build_model(cfg.replace(pretrained=False, freeze="none", warmup_epochs=0), len(groups),
                            int(state["image_size"]), groups=groups)
        model.load_state_dict(state["model"], strict=True)
    except (ConfigError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: the model in it cannot be rebuilt: {first}") from None
    try:
        model.to(resolve_device(str(device))).eval()
    except (RuntimeError, AssertionError) as exc:  # a misspelt device, or one this machine lacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"device {str(device)!r} cannot be used here ({first}); "
                          "choose auto, cpu, cuda or mps") from None
    return LoadedModel(
        model=model, cfg=cfg, groups=groups,
        mean=[float(v) for v in state["norm"]["mean"]], std=[float(v) for v in state["norm"]["std"]],
        image_size=int(state["image_size"]), square=state.get("square", "crop"),
        kind="export" if state["format"] == EXPORT_FORMAT else "checkpoint", path=path,
        metrics=dict(state.get("metrics") or {}), provenance=dict(state.get("provenance") or {}),
        sha256=state.get("sha256"),
        seen=set(state["seen_images"].tolist()) if state.get("seen_images") is not None else None,
        temperature=float(state.get("temperature", 1.0)),
    )


# --- writing ---------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    checkpoint: CheckpointRef
    metric: str
    sha256: str
    program: dict[str, Any] | None = None  # path and the self-check's figures of the .pt2 export
    not_kept: str | None = None  # a better epoch that result.json reports but Ray did not keep
    refit: dict[str, Any] | None = None  # test metrics of the model retrained on train+val
    folds: int | None = None  # the trial cross-validated this many folds (without --refit)
    onnx: dict[str, Any] | None = None  # path and the self-check's figures of the ONNX export
    calibration: dict[str, Any] | None = None  # export --calibrate: the temperature and its figures

    def lines(self) -> list[str]:
        from .intervals import wilson

        value = self.checkpoint.value(self.metric)
        base = " (the seed baseline)" if self.checkpoint.baseline else ""
        out = [
            f"best checkpoint: trial {self.checkpoint.trial_id}{base}, epoch {self.checkpoint.epoch}, "
            f"{self.metric} {value:.4f}",
        ]
        if self.refit:
            r = self.refit
            low, high = wilson(r["test_acc"], int(r["test_n"]))
            out.append(f"refit: its configuration retrained on train+val ({r['n_train']} images) for "
                       f"{self.checkpoint.epoch} epochs; test split ({r['test_n']} images, scored once): "
                       f"accuracy {r['test_acc']:.4f} [95% {low:.3f}-{high:.3f}], one_off {r['test_one_off']:.4f}")
        elif self.folds:
            out.append(f"note: the trial cross-validated {self.folds} folds; this is its first fold's model "
                       f"(trained on {self.folds - 1}/{self.folds} of train+val); --refit trains one on all of it")
        if self.calibration:
            c = self.calibration
            out.append(f"calibrated: temperature {c['temperature']:.3f} fitted on the validation split "
                       f"({c['val_n']} images): NLL {c['val_nll'][0]:.3f} -> {c['val_nll'][1]:.3f}, ECE "
                       f"{c['val_ece'][0]:.3f} -> {c['val_ece'][1]:.3f}; on the test split ({c['test_n']} images, "
                       f"not used to fit): ECE {c['test_ece'][0]:.3f} -> {c['test_ece'][1]:.3f}")
        out.append(f"wrote {self.path} (sha256 {self.sha256[:16]}...)")
        for o, what, runner in ((self.program, "torch.export program", "the loaded program"),
                                (self.onnx, "ONNX", "onnxruntime")):
            if o:
                out.append(f"wrote {o['path']} ({what} with preprocessing; uint8 RGB N x 3 x H x W in, any batch "
                           f"and size): {runner} agrees with PyTorch on the {o['images']} validation images and "
                           f"{o['non_square']} non-square versions of them: same groups, probabilities within "
                           f"{o['max_diff']:.1e}")
        if self.not_kept:
            out.append(f"note: {self.not_kept}")
        return out


def better_epoch_not_kept(exp: Experiment, ref: CheckpointRef, metric: str) -> str | None:
    """Ray keeps each trial's best checkpoints by the search metric; chosen by another
    metric, the best epoch in result.json may have no checkpoint left. Says which."""
    chosen = selection_score(ref.metrics, metric)
    best = (chosen, "", 0, None)
    for entry in exp.trials.values():
        if entry["status"] in FAILED:
            continue
        for row in exp.history(entry):
            score = selection_score(row, metric)
            if score is not None and score > best[0]:
                best = (score, entry["trial_id"], int(row.get("epoch", 0)), row[metric])
    if best[1]:
        return (f"trial {best[1]} epoch {best[2]} reported {metric} {best[3]:.4f}, but Ray "
                f"kept no checkpoint of it (it keeps the best by {exp.metric})")
    return None


def program_path(out: Path) -> Path:
    return out.with_suffix(".pt2")


def onnx_path(out: Path) -> Path:
    return out.with_suffix(".onnx")


ONNX_FORMAT = "tune_age.onnx/1"
PROGRAM_FORMAT = "tune_age.pt2/1"
EXPORT_TOLERANCE = 1e-4  # largest probability difference from PyTorch an exported program may have
ONNX_INSTALL = 'pip install "tune_age[onnx]" (onnx, onnxruntime and onnxscript)'


def _write_onnx(loaded: LoadedModel, out: Path, images: torch.Tensor, provenance: dict[str, Any]) -> dict[str, Any]:
    """An ONNX model of the network with its preprocessing (Packaged: uint8 RGB, dynamic
    batch, height and width), the groups and provenance in its metadata; written only if
    onnxruntime gives the same groups as PyTorch on `images` (the validation split, and
    non-square versions of some) with probabilities within EXPORT_TOLERANCE."""
    import contextlib
    import io

    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ConfigError(f"--onnx needs the ONNX packages: {ONNX_INSTALL}") from None
    packaged = Packaged(loaded.model.cpu(), loaded.mean, loaded.std, loaded.image_size, loaded.square,
                        loaded.temperature).eval()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(packaged, (images[:2],), tmp, dynamic_shapes={"images": _dims()},
                              input_names=["images"], output_names=["probabilities"], dynamo=True,
                              opset_version=18)
        model = onnx.load(tmp)
        meta = {"format": ONNX_FORMAT, "groups": loaded.groups.to_dict(), "image_size": loaded.image_size,
                "input": INPUT, "square": loaded.square, "output": "probabilities, N x len(groups)",
                "export_sha256": loaded.sha256, "provenance": provenance}
        del model.metadata_props[:]
        for key, value in (("tune_age", json.dumps(meta, default=str)), ("groups", ",".join(loaded.groups.names))):
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, tmp)
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        figures = _check_program(packaged, lambda batch: session.run(None, {"images": batch.numpy()})[0],
                                 images, f"the ONNX export disagrees with PyTorch; {out} not written")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _usual_mode(out)
    return {"path": out, **figures}


def split_images(exp: Experiment, image_size: int, splits: tuple[str, ...] = ("val",)
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (images, labels)} of the search's own splits at `image_size`, the data loaded
    once (decoding cached) and checked to be the search's (report.load_search_data): a
    calibration or a self-check on other images would say nothing about this model."""
    from .report import load_search_data

    data, why = load_search_data(exp, [image_size])
    if data is None:
        raise TuneAgeError(f"{exp.path}: the search's validation images are needed, but {why}")
    out = {}
    for split in splits:
        rows = data.splits[split]
        out[split] = (torch.from_numpy(np.ascontiguousarray(data.images[image_size][rows])),
                      torch.from_numpy(np.asarray(data.labels[rows], dtype=np.int64)))
    return out


def calibrate(exp: Experiment, loaded: LoadedModel) -> dict[str, Any]:
    """The temperature fitted on the validation split, and NLL and ECE before and after on it
    and on the test split (which the fit never sees); see calibration.calibration_figures."""
    from .calibration import calibration_figures

    logits = {split: (predict_logits(loaded.model, images, norm=loaded.normalizer()).float().cpu(), labels)
              for split, (images, labels) in split_images(exp, loaded.image_size, ("val", "test")).items()}
    return calibration_figures(logits)


def export_best(
    exp_dir: str | Path,
    out: str | Path,
    metric: str | None = None,
    force: bool = False,
    program: bool = False,
    refit: bool = False,
    pick: str | None = None,
    onnx: bool = False,
    calibrated: bool = False,
) -> ExportResult:
    """Writes the best checkpoint of the experiment as one verified file (see the module doc);
    with `refit`, the best configuration retrained on train+val instead (results/refit.py)."""
    out = Path(out).expanduser()
    if out.suffix in (".pt2", ".onnx"):
        raise ConfigError(f"--out {out}: give the .pt file's name (best.pt); --pt2 and --onnx write "
                          "theirs beside it")
    targets = [out] + ([program_path(out)] if program else []) + ([onnx_path(out)] if onnx else [])
    for target in targets:
        if target.is_dir():
            raise TuneAgeError(f"{target} is a folder; give a file name such as best.pt")
        if target.exists() and not force:
            raise TuneAgeError(f"{target} already exists; choose another --out or add --force to replace it")
    exp = load_experiment(exp_dir)
    metric = metric or exp.metric
    ref = best_checkpoint(exp, metric, pick_trials(exp, pick) if pick else None)
    state = read_artifact(ref.path)
    folds = state.get("cv_folds")
    refit_test = None
    if refit:
        from .refit import refit as retrain

        state, refit_test = retrain(exp, exp.trials.get(ref.trial_id), epochs=ref.epoch)
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": state["model"],
        "config": state["config"],
        "groups": state["groups"],
        "norm": state["norm"],
        "image_size": int(state["image_size"]),
        "square": exp.meta.get("data", {}).get("square", "crop"),
        "metrics": state.get("metrics") or {},
        "history": state.get("history") or [],
        "seen_images": state.get("seen_images"),
        "provenance": {
            "experiment": exp.source or str(exp.path.resolve()),
            "experiment_name": exp.name,
            "trial_id": ref.trial_id,
            "baseline": ref.baseline,
            "epoch": ref.epoch,
            "checkpoint": str(ref.path.relative_to(exp.path)),
            "selected_by": {"metric": metric, "mode": METRICS[metric], "value": ref.value(metric),
                            "pick": pick, "measured": {k: v for k, v in (exp.trials.get(ref.trial_id, {})
                                                       .get("last") or {}).items() if k in MEASURES}},
            "pretrained": _pretrained_note(state["config"]),
            "refit": ({"trained_on": "train+val", "images": refit_test["n_train"], "epochs": ref.epoch,
                       "test": {k: v for k, v in refit_test.items() if not isinstance(v, list)}}
                      if refit_test else None),
            "cv_folds": folds,
            "data_fingerprint": state.get("data_fingerprint"),
            "data_source": exp.meta.get("data_source"),
            "data_config": exp.meta.get("data"),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"tune_age": __version__, "torch": str(torch.__version__)},
        },
    }
    calibration = None
    if calibrated:
        if refit:
            raise ConfigError("--calibrate with --refit: the refit model trained on the validation split, "
                              "where the temperature is fitted; calibrate the search's own model (no --refit)")
        if folds and folds > 1:
            raise ConfigError(f"--calibrate: the trial cross-validated {folds} folds, so its model trained on "
                              "part of the validation split; calibrate a search run with --cv 1")
        probe = {**payload, "sha256": payload_sha256(payload)}
        save_atomic(probe, out)
        calibration = calibrate(exp, load_model(out))
        payload["temperature"] = calibration["temperature"]
    payload["sha256"] = payload_sha256(payload)
    save_atomic(payload, out)
    _usual_mode(out)
    loaded = load_model(out)  # reads it back: hash, strict load and all
    val_images = split_images(exp, loaded.image_size)["val"][0] if program or onnx else None
    program_done = _write_program(loaded, program_path(out), val_images, payload["provenance"]) if program else None
    onnx_done = _write_onnx(loaded, onnx_path(out), val_images, payload["provenance"]) if onnx else None
    log.debug("exported trial %s epoch %d to %s", ref.trial_id, ref.epoch, out)
    return ExportResult(out, ref, metric, payload["sha256"], program_done,
                        better_epoch_not_kept(exp, ref, metric), refit_test, None if refit else folds, onnx_done,
                        calibration)


def _pretrained_note(config: dict[str, Any]) -> str | None:
    """Where a pretrained body came from, and its license where it has one (face_resnet's)."""
    if not config.get("pretrained"):
        return None
    spec = BACKBONES[config["arch"]]
    return spec.license or spec.weights


class Packaged(nn.Module):
    """The network with its preprocessing: RGB images in (uint8 0-255, or float 0-1), any
    H x W, made square and resized by preprocess.square_resize exactly as training decoded
    them (`square`: crop or pad), probabilities per age group out."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], image_size: int,
                 square: str = "crop", temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.image_size = image_size
        self.square = square

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Float input is taken back to whole 0-255 values, as the uint8 it was decoded from.
        x = images.float() if images.dtype == torch.uint8 else (images.float() * 255.0).round()
        x = square_resize(x, self.image_size, self.square) / 255.0
        return torch.softmax(self.model((x - self.mean) / self.std) / self.temperature, dim=1)


INPUT = ("uint8 RGB, N x 3 x H x W, any N, H, W; made square (`square`: centre crop or pad) and resized "
         "to image_size as in training")
EXPORT_DIMS = {0: ("batch", 1, 65536), 2: ("height", 2, 65536), 3: ("width", 2, 65536)}


def _dims() -> dict[int, Any]:
    return {axis: torch.export.Dim(name, min=low, max=high) for axis, (name, low, high) in EXPORT_DIMS.items()}


def _check_program(packaged: nn.Module, run, images: torch.Tensor, refusal: str) -> dict[str, Any]:
    """Runs an exported program (`run`: uint8 batch -> probabilities as numpy) on `images` (the
    validation split) and on wide and tall versions of some, against `packaged` in PyTorch:
    the figures when every predicted group agrees and no probability differs by more than
    EXPORT_TOLERANCE, else an ArtifactError starting with `refusal`."""
    side = images.shape[-1]
    wide = torch.cat([images[:8], images[:8].flip(3)[..., : max(1, side // 2)]], dim=3)  # S x 1.5 S
    tall = torch.cat([images[:8], images[:8].flip(2)[..., : max(1, side // 3), :]], dim=2)  # 1.33 S x S
    differ, diff, count = 0, 0.0, 0
    for batch in [*images.split(256), wide, tall]:
        with torch.no_grad():
            mine = packaged(batch).numpy()
            theirs = np.asarray(run(batch))
        differ += int((mine.argmax(1) != theirs.argmax(1)).sum())
        diff = max(diff, float(np.abs(mine - theirs).max()))
        count += len(batch)
    if differ or diff > EXPORT_TOLERANCE:
        raise ArtifactError(f"{refusal} (on the validation images and non-square versions: {differ} of {count} "
                            f"predicted groups differ, probabilities by up to {diff:.1e}, tolerance "
                            f"{EXPORT_TOLERANCE:g})")
    return {"images": len(images), "non_square": len(wide) + len(tall), "max_diff": diff}


def _write_program(loaded: LoadedModel, out: Path, images: torch.Tensor, provenance: dict[str, Any]) -> dict[str, Any]:
    """A torch.export program of Packaged (uint8 RGB in, dynamic batch, height and width), the
    groups and provenance in its `tune_age.json` extra file; written only if the program,
    saved and loaded back, agrees with PyTorch (_check_program)."""
    packaged = Packaged(loaded.model.cpu(), loaded.mean, loaded.std, loaded.image_size, loaded.square,
                        loaded.temperature).eval()
    meta = {"format": PROGRAM_FORMAT, "groups": loaded.groups.to_dict(), "image_size": loaded.image_size,
            "input": INPUT, "square": loaded.square, "output": "probabilities, N x len(groups)",
            "export_sha256": loaded.sha256, "provenance": provenance}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp.pt2")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(packaged, (images[:2],), dynamic_shapes={"images": _dims()})
            torch.export.save(program, tmp, extra_files={"tune_age.json": json.dumps(meta, default=str)})
            back = torch.export.load(tmp).module()
        figures = _check_program(packaged, lambda batch: back(batch).detach().numpy(), images,
                                 f"the torch.export program disagrees with PyTorch; {out} not written")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _usual_mode(out)
    return {"path": out, **figures}


def _usual_mode(path: Path) -> None:
    """Temporary files are created private (0600); give the artifact the umask's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
