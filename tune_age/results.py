"""Reading an experiment folder back, without Ray: what was asked, what each trial did.

    exp = load_experiment("~/tune_age_results/search-20261128-120000")
    exp.best_trial()        # the trial entry with the best value of the metric
    exp.frame()             # one row per trial, as a pandas DataFrame

Works while the search runs (the files are rewritten atomically), after it,
and on another machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import TuneAgeError
from .search import META_FILE, STUDY_FILE
from .tracking import TRIALS_FILE

FAILED = ("errored", "diverged")


@dataclass
class Experiment:
    path: Path
    meta: dict[str, Any]
    trials: dict[str, dict[str, Any]]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def study_path(self) -> Path:
        return self.path / STUDY_FILE

    def _key(self, entry: dict[str, Any]) -> float:
        return entry["best"] if self.mode == "max" else -entry["best"]

    def best_trial(self, include_baseline: bool = True) -> dict[str, Any] | None:
        scored = [
            t for t in self.trials.values()
            if t["best"] is not None and t["status"] not in FAILED
            and (include_baseline or not is_baseline(t))
        ]
        return max(scored, key=self._key) if scored else None

    def baseline_trial(self) -> dict[str, Any] | None:
        return next((t for t in self.trials.values() if is_baseline(t)), None)

    def failed(self) -> list[dict[str, Any]]:
        return [t for t in self.trials.values() if t["status"] in FAILED or t["errors"]]

    def trial_dir(self, entry: dict[str, Any]) -> Path:
        return self.path / entry["dir"]

    def frame(self) -> pd.DataFrame:
        """One row per trial: id, status, epochs, best, last, then the hyperparameters."""
        rows = []
        for t in self.trials.values():
            last = (t.get("last") or {}).get(self.metric)
            row = {
                "trial_id": t["trial_id"],
                "status": t["status"],
                "epochs": t["epochs"],
                f"best_{self.metric}": t["best"],
                f"last_{self.metric}": None if (t.get("last") or {}).get("diverged") else last,
                "baseline": is_baseline(t),
            }
            row.update({k: v for k, v in t["config"].items() if not k.startswith("_")})
            rows.append(row)
        return pd.DataFrame(rows)


def is_baseline(entry: dict[str, Any]) -> bool:
    return bool(entry.get("config", {}).get("_baseline"))


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path).expanduser()
    if not (path / META_FILE).is_file():
        raise TuneAgeError(
            f"{path} is not a tune_age experiment folder (no {META_FILE}); "
            "give the folder that `tune-age search` printed"
        )
    meta = json.loads((path / META_FILE).read_text())
    trials_file = path / TRIALS_FILE
    trials = json.loads(trials_file.read_text()) if trials_file.is_file() else {}
    return Experiment(path, meta, trials)


def summary_lines(exp: Experiment) -> list[str]:
    """The end-of-search summary: best, baseline, failures, where to look next."""
    metric = exp.metric
    lines = []
    counts = pd.Series([t["status"] for t in exp.trials.values()]).value_counts()
    lines.append(f"trials: {len(exp.trials)} (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")")
    best = exp.best_trial(include_baseline=False)
    base = exp.baseline_trial()
    if best:
        lines.append(f"best {metric}: {best['best']:.4f} (trial {best['trial_id']}, epoch {best['best_epoch']})")
        shown = {k: v for k, v in best["config"].items() if not k.startswith("_")}
        lines.append("best configuration: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    else:
        lines.append("no trial finished with a score")
    if base:
        score = f"{base['best']:.4f}" if base["best"] is not None else base["status"]
        lines.append(f"seed baseline {metric}: {score} (trial {base['trial_id']})")
    for t in exp.failed():
        why = t["errors"][-1] if t["errors"] else (t.get("last") or {}).get("error", "")
        lines.append(f"trial {t['trial_id']} {t['status']} after {t['attempts']} attempt(s): {why}")
    lines.append(f"experiment folder: {exp.path}")
    lines.append(f"next: tune-age trials {exp.path}")
    lines.append(f"      tune-age report {exp.path}")
    lines.append(f"      tune-age export {exp.path} --out best.pt")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
