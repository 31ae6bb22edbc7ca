"""`TrialLog`: a Ray Tune callback that keeps `trials.jsonl` in the experiment folder.

One entry per trial: status (running, completed, early-stopped, diverged,
errored, retrying, interrupted, stopped by the time budget, or lost: started
just before the driver died and never resumed by Ray), its config, epochs run, the last and best
value of the metric, the error of a failed attempt, and where it ran. The
file is rewritten atomically on every event, so `tune-age trials` can read it
while the search runs, after it, and on another machine, without Ray. Each
result also becomes one progress line for the user.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from ..config import MEASURES
from ..training.selection import selection_score

log = logging.getLogger(__name__)
progress = logging.getLogger("tune_age.progress")  # the CLI prints these lines as they are

# JSON lines, one trial each. Not ".json": on restore Ray copies every *.json and
# *.pkl of the experiment folder into its staging folder and later copies them
# back, which would put an old trial log over the new one.
TRIALS_FILE = "trials.jsonl"
UNFINISHED = ("running", "pending", "retrying")
FINAL = ("completed", "early-stopped", "diverged", "errored", "stopped")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON (or, for a .jsonl path, one line per value of a dict) atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(value, default=str) + "\n" for value in obj.values())
        else:
            json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# Experiment name -> its folder for this driver, set before a restore: what Ray unpickles
# (this callback, the scheduler, the searcher) holds the paths of the driver that began the
# search, whose folder may have been elsewhere (another machine's copy of an object store's).
RELOCATED: dict[str, Path] = {}


def relocated(path: str | Path) -> Path:
    """`path`, a file in an experiment folder, in this driver's folder of that experiment."""
    path = Path(path)
    here = RELOCATED.get(path.parent.name)
    return here / path.name if here is not None else path


def read_trials(path: Path) -> dict[str, dict[str, Any]]:
    """The trial log as {trial_id: entry}; empty when there is none yet."""
    if not path.is_file():
        return {}
    entries = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {e["trial_id"]: e for e in entries}


def _last_error_line(trial: Any) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return "unknown error (see the trial folder's error.txt)"


class TrialLog(tune.Callback):
    def __init__(
        self,
        exp_dir: str | Path,
        metric: str,
        mode: str,
        max_epochs: int,
    ):
        self.path = Path(exp_dir) / TRIALS_FILE
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.trials: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        """A resumed search: what was running is interrupted until Ray says more."""
        self.trials = read_trials(self.path)
        if self.trials:
            for entry in self.trials.values():
                if entry["status"] in UNFINISHED:
                    entry["status"] = "interrupted"

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles this callback as it was when the search began;
        # the file on disk knows what happened since.
        self.__dict__.update(state)
        self.path = relocated(self.path)
        self._load()

    def _entry(self, trial: Any) -> dict[str, Any]:
        entry = self.trials.setdefault(
            trial.trial_id,
            {
                "trial_id": trial.trial_id,
                "status": "pending",
                "config": {k: v for k, v in trial.config.items()},
                "dir": Path(trial.local_path).name if trial.local_path else None,
                "epochs": 0,
                "best": None,
                "best_epoch": None,
                "best_score": None,  # training.selection's score of the best epoch
                "scores": [],
                "last": None,
                "attempts": 1,
                "starts": 0,  # how often a worker began (or resumed) this trial
                "errors": [],
                "started": time.time(),
                "ended": None,
            },
        )
        return entry

    def _save(self) -> None:
        write_json_atomic(self.path, self.trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._entry(trial)
        entry["status"] = "running"
        entry["starts"] += 1
        entry["dir"] = Path(trial.local_path).name
        self._save()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        entry = self._entry(trial)
        entry["status"] = "running"
        value = result.get(self.metric)
        keep = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) or k == "gpu_ids"}
        entry["last"] = {k: keep[k] for k in keep if k.startswith(("val_", "train_")) or k in (
            "epoch", "images_per_sec", "node_id", "device", "gpu_ids", "diverged", "error", "baseline",
            "images_from", *MEASURES)}
        entry["epochs"] = int(result.get("epoch", entry["epochs"]))
        # A restored trial reports again from the epoch after its checkpoint: what it had
        # reported from there on was lost with the run that reported it.
        scores = [s for s in entry.get("scores", []) if s[0] < entry["epochs"]]
        score = selection_score(result, self.metric)
        if score is not None:
            scores.append([entry["epochs"], value, score])
        entry["scores"] = scores  # [epoch, metric, selection score] of every surviving epoch
        best = max(reversed(scores), key=lambda s: s[2], default=None)  # ties: the later epoch
        entry["best_epoch"], entry["best"], entry["best_score"] = best if best else (None, None, None)
        self._save()
        if progress.isEnabledFor(logging.INFO):
            best = [e for e in self.trials.values() if e["best"] is not None]
            top = max(best, key=lambda e: e["best"] if self.mode == "max" else -e["best"]) if best else None
            tail = f" | best {top['best']:.4f} ({top['trial_id']})" if top else ""
            shown = "diverged" if result.get("diverged") else f"{self.metric} {value:.4f}"
            progress.info(
                f"{time.strftime('%H:%M:%S')} trial {trial.trial_id} epoch {entry['epochs']}/"
                f"{self.max_epochs} {shown}{tail}"
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._entry(trial)
        last = entry.get("last") or {}
        if last.get("diverged"):
            entry["status"] = "diverged"
        elif entry["epochs"] >= self.max_epochs:
            entry["status"] = "completed"
        else:
            entry["status"] = "early-stopped"
        entry["ended"] = time.time()
        self._save()
        if progress.isEnabledFor(logging.INFO):
            progress.info(f"{time.strftime('%H:%M:%S')} trial {trial.trial_id} {entry['status']} "
                      f"after {entry['epochs']} epochs")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._entry(trial)
        entry["errors"].append(_last_error_line(trial))
        entry["attempts"] += 1
        entry["status"] = "retrying"
        self._save()
        if progress.isEnabledFor(logging.INFO):
            progress.info(f"trial {trial.trial_id} failed ({entry['errors'][-1]}); retrying")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._entry(trial)
        entry["errors"].append(_last_error_line(trial))
        entry["status"] = "errored"
        entry["ended"] = time.time()
        self._save()
        if progress.isEnabledFor(logging.INFO):
            progress.info(f"trial {trial.trial_id} errored: {entry['errors'][-1]}")
