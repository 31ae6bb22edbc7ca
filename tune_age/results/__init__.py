"""Reading an experiment folder back, without Ray: what was asked, what each trial did.

    exp = load_experiment("~/tune_age_results/search-20261128-120000")
    exp.best_trial()        # the trial entry with the best value of the metric
    exp.history(entry)      # every epoch a trial reported (its result.json)
    table = trials_table(exp, sort="val_f1", top=5, status=["completed"])
    print(render(exp, table, "table"))   # or "csv", "markdown", "json"

Works while the search runs (the files are rewritten atomically), after it,
and on another machine; a storage URI (s3://bucket/results/name) is copied into
the cache first. `tune-age trials` is `trials_table` + `render`;
`--follow` is `follow`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from ..config import MEASURES, METRICS, TrainConfig
from ..errors import ConfigError, TuneAgeError
from ..search import META_FILE, STUDY_FILE
from ..search.lock import driver_alive
from ..search.tracking import FINAL, TRIALS_FILE, UNFINISHED, read_trials

FAILED = ("errored", "diverged")
# What tracking.py and search.py write: ended, still going, cut off by a dead driver, and
# asked for just before the driver died but never run.
STATUSES = tuple(dict.fromkeys(FINAL + UNFINISHED + ("interrupted", "lost")))
FORMATS = ("table", "csv", "markdown", "json")
RESULT_FILE = "result.json"  # Ray's per-trial log: one JSON object per reported epoch
CORE = ("trial_id", "status", "epochs")
# Hyperparameters the narrow table shows first (the ones that usually matter most), under
# short headers; the rest follow in the space's order while they fit.
PRIORITY = ("lr", "optimizer", "batch_size", "weight_decay", "image_size", "conv_layers",
            "channels", "dropout", "arch")
SHORT = {
    "image_size": "size", "conv_layers": "convs", "channels": "ch", "channel_growth": "grow",
    "kernel_size": "kern", "batch_norm": "bn", "fc_layers": "fcs", "fc_width": "fc_w",
    "dropout": "drop", "optimizer": "opt", "weight_decay": "wd", "momentum": "mom",
    "schedule": "sched", "label_smoothing": "smooth", "class_weighting": "cw",
    "batch_size": "bs", "crop_scale": "crop", "color_jitter": "jitter", "pretrained": "pre",
}


@dataclass
class Experiment:
    path: Path
    meta: dict[str, Any]
    trials: dict[str, dict[str, Any]]
    source: str | None = None  # the storage URI it was copied from, when not a local folder

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def study_path(self) -> Path:
        return self.path / STUDY_FILE

    @property
    def study_url(self) -> str:
        """The study's storage: the folder's study.db, or the search's --study-storage."""
        from ..search.study import study_url

        return study_url(self.path, self.meta)

    def best_trial(self, include_baseline: bool = True) -> dict[str, Any] | None:
        """The trial of the best model (see export.best_checkpoint): failed trials left out,
        ranked by their best epoch's training.selection score."""
        scored = [
            t for t in self.trials.values()
            if t["best"] is not None and t["status"] not in FAILED
            and (include_baseline or not is_baseline(t))
        ]
        return max(scored, key=lambda t: trial_score(self, t)) if scored else None

    def baseline_trial(self) -> dict[str, Any] | None:
        return next((t for t in self.trials.values() if is_baseline(t)), None)

    def failed(self) -> list[dict[str, Any]]:
        return [t for t in self.trials.values() if t["status"] in FAILED or t["errors"]]

    def trial_dir(self, entry: dict[str, Any]) -> Path:
        return self.path / entry["dir"]

    def searched_params(self) -> list[str]:
        """The space's searched parameters, in the space's order (fixed values left out)."""
        params = self.meta.get("space", {}).get("values", {}).get("params", {})
        return [name for name, spec in params.items() if isinstance(spec, dict)]

    def finished(self) -> bool:
        """The search has ended, done or not: no driver runs it (search/lock.py)."""
        return not driver_alive(self.path)

    def history(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """Every result the trial reported (one per epoch), oldest first; [] before the first.

        A line that is being written while we read is skipped; a restored trial that
        reported an epoch twice keeps the later report.
        """
        if not entry.get("dir"):
            return []
        file = self.trial_dir(entry) / RESULT_FILE
        if not file.is_file():
            return []
        by_epoch: dict[int, dict[str, Any]] = {}
        for line in file.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                by_epoch[int(row.get("epoch", row.get("training_iteration", len(by_epoch) + 1)))] = row
        return [by_epoch[e] for e in sorted(by_epoch)]


def trial_score(exp: Experiment, entry: dict[str, Any]) -> float:
    """The selection score of a trial's best epoch; from its value alone in older trial logs."""
    if entry.get("best_score") is not None:
        return entry["best_score"]
    return direction(exp.metric) * entry["best"] if entry.get("best") is not None else -math.inf


def objective_sign(name: str) -> int:
    """+1 where larger is better, for a metric or a measure."""
    return -1 if name in MEASURES else direction(name)


def objective_values(exp: Experiment, entry: dict[str, Any], objectives: list[str]) -> list[float] | None:
    """A trial's value of each objective: its best epoch's for the metric, its measured ones
    for the rest; None when one is missing."""
    last = entry.get("last") or {}
    values = [entry.get("best")] + [last.get(name) for name in objectives[1:]]
    return None if any(v is None for v in values) else [float(v) for v in values]


def pareto_front(exp: Experiment) -> list[dict[str, Any]]:
    """The trials no other trial beats on every objective of a multi-objective search (failed
    trials left out), best first by the first objective."""
    objectives = exp.meta.get("objectives") or [exp.metric]
    scored = []
    for entry in exp.trials.values():
        values = objective_values(exp, entry, objectives)
        if values is not None and entry["status"] not in FAILED:
            scored.append((entry, [objective_sign(o) * v for o, v in zip(objectives, values)]))

    def dominated(a: list[float]) -> bool:
        return any(all(x >= y for x, y in zip(b, a)) and b != a for _, b in scored)

    front = [entry for entry, signed in scored if not dominated(signed)]
    return sorted(front, key=lambda e: -objective_sign(objectives[0]) * e["best"])


def pick_trials(exp: Experiment, rule: str) -> set[str]:
    """The ids of the trials that meet a constraint such as "latency_ms<=5" (a measure or a
    metric of their best epoch); a TuneAgeError when the rule is malformed or none meets it."""
    import operator
    import re

    ops = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
    match = re.fullmatch(r"\s*(\w+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*", rule)
    if not match:
        raise TuneAgeError(f"--pick {rule!r}: not a constraint; write NAME<=VALUE (or <, >=, >), "
                           "for example latency_ms<=5")
    name, op, raw = match.groups()
    try:
        bound = float(raw)
    except ValueError:
        raise TuneAgeError(f"--pick {rule!r}: {raw!r} is not a number") from None

    def value(entry: dict[str, Any]) -> float | None:
        if name == exp.metric:
            return entry.get("best")
        return (entry.get("last") or {}).get(name)

    measured = {tid: value(e) for tid, e in exp.trials.items() if e["status"] not in FAILED and value(e) is not None}
    if not measured:
        hint = " (search with --objectives val_acc,latency_ms)" if name in MEASURES else ""
        raise TuneAgeError(f"--pick {rule!r}: no trial of {exp.name!r} measured {name}{hint}; "
                           f"measures are {', '.join(MEASURES)} and the metric {exp.metric}")
    chosen = {tid for tid, v in measured.items() if ops[op](v, bound)}
    if not chosen:
        closest = min(measured, key=lambda tid: abs(measured[tid] - bound))
        raise TuneAgeError(f"--pick {rule!r}: no trial qualifies; the closest is trial {closest} with "
                           f"{name} {measured[closest]:.4g}")
    return chosen


def is_baseline(entry: dict[str, Any]) -> bool:
    return bool(entry.get("config", {}).get("_baseline"))


def direction(metric: str) -> int:
    """+1 where a larger `metric` is better (val_acc), -1 where a smaller one is (val_loss)."""
    return 1 if METRICS[metric] == "max" else -1


def last_error(entry: dict[str, Any]) -> str:
    """The last error a trial logged, or the one its last report carries; "" when none."""
    return entry["errors"][-1] if entry["errors"] else (entry.get("last") or {}).get("error", "")


def hyperparameters(entry: dict[str, Any]) -> dict[str, Any]:
    """The configuration a trial trained with: its config over TrainConfig's defaults.

    `epochs` is left out: every trial trains for the search's max_epochs whatever its
    config says, and the epochs it actually ran are a column of their own.
    """
    values = {**TrainConfig().to_dict(), **entry.get("config", {})}
    return {k: v for k, v in values.items() if not k.startswith("_") and k != "epochs"}


def local_folder(path: str | Path) -> tuple[Path, str | None]:
    """(a local folder, the URI it came from): a path or file:// URI as it is; any other
    storage URI that pyarrow reads (s3://, gs://, ...) copied into the cache first."""
    text = str(path)
    if "://" not in text:
        return Path(text).expanduser(), None
    if text.startswith("file://"):
        return Path(text[len("file://"):]), None
    from ..search.storage import is_remote, local_copy

    if not is_remote(text):
        raise TuneAgeError(f"{text}: give a folder or an object-store URI (s3://BUCKET/PREFIX/NAME, gs://...)")
    try:
        return local_copy(text), text
    except OSError as exc:  # the store went away halfway
        raise TuneAgeError(f"cannot read {text}: {str(exc).splitlines()[0]}") from None


def load_experiment(path: str | Path) -> Experiment:
    """An experiment folder, or a storage URI of one (copied to the cache, then read)."""
    path, source = local_folder(path)
    if not (path / META_FILE).is_file():
        raise TuneAgeError(
            f"{path} is not a tune_age experiment folder (no {META_FILE}); "
            "give the folder that `tune-age search` printed"
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise TuneAgeError(f"{path / META_FILE}: not valid JSON ({exc.msg}, line {exc.lineno}); "
                           "the file was damaged or edited by hand") from None
    trials = read_trials(path / TRIALS_FILE)
    if not driver_alive(path):  # the driver died (SIGKILL, a lost node) with trials running
        for entry in trials.values():
            if entry["status"] in UNFINISHED:
                entry["status"] = "interrupted"
    return Experiment(path, meta, trials, source)


# --- the trials table ------------------------------------------------------------------------


def best_and_last(exp: Experiment, entry: dict[str, Any], metric: str) -> tuple[float | None, float | None, int | None]:
    """(best, last, best epoch) of `metric` for one trial; diverged epochs do not count."""
    if metric == exp.metric:
        last = (entry.get("last") or {})
        return entry["best"], None if last.get("diverged") else last.get(metric), entry.get("best_epoch")
    sign = direction(metric)
    best = last = best_epoch = None
    for row in exp.history(entry):
        value = row.get(metric)
        if row.get("diverged") or not isinstance(value, (int, float)) or not math.isfinite(value):
            last = None
            continue
        last = value
        if best is None or sign * value > sign * best:
            best, best_epoch = value, int(row.get("epoch", 0))
    return best, last, best_epoch


def trials_table(
    exp: Experiment,
    sort: str | None = None,
    top: int | None = None,
    status: list[str] | None = None,
    columns: list[str] | None = None,
    reverse: bool = False,
) -> pd.DataFrame:
    """One row per trial, best first by the search metric (or `sort`): every column by default.

    Columns: trial_id, status, epochs, best_<m>, last_<m>, best_epoch, baseline, then the
    hyperparameters. `sort` is a metric name (its best value, best first; adds that metric's
    best/last columns) or any column name (ascending); `reverse` flips the order.
    """
    for s in status or []:
        if s not in STATUSES:
            raise ConfigError(f"status {s!r} is not valid; choose from {', '.join(STATUSES)}")
    metric = exp.metric
    metrics = [metric] + ([sort] if sort in METRICS and sort != metric else [])
    rows = []
    for t in exp.trials.values():
        row: dict[str, Any] = {"trial_id": t["trial_id"], "status": t["status"], "epochs": t["epochs"]}
        for m in metrics:
            best, last, best_epoch = best_and_last(exp, t, m)
            row[f"best_{m}"], row[f"last_{m}"] = best, last
            if m == metric:
                row["best_epoch"] = best_epoch
        row["baseline"] = is_baseline(t)
        row.update(hyperparameters(t))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=_column_order(rows, exp, metrics))
    if status:
        frame = frame[frame["status"].isin(status)]
    key = sort or metric
    if key == metric:
        # Best first by the one rule (ties to the lower val_loss), unscored trials last.
        scores = [trial_score(exp, t) if t["best"] is not None else -math.inf for t in exp.trials.values()]
        order = pd.Series(scores, index=range(len(scores))).loc[frame.index]
        frame = frame.loc[order.sort_values(ascending=False, kind="stable").index]
    elif key in METRICS:
        # Best first; trials without a score last, whatever the direction.
        frame = frame.sort_values(f"best_{key}", ascending=METRICS[key] == "min", na_position="last",
                                  kind="stable")
    elif key in frame.columns:
        frame = _sort_mixed(frame, key)
    else:
        valid = list(METRICS) + [c for c in frame.columns if c not in METRICS]
        raise ConfigError(f"cannot sort by {key!r}; choose a metric or a column: {', '.join(valid)}")
    if reverse:
        frame = frame.iloc[::-1]
    if top is not None:
        if top < 1:
            raise ConfigError(f"--top {top} is not valid; give 1 or more")
        frame = frame.head(top)
    if columns:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise ConfigError(f"unknown column {unknown[0]!r}; valid columns: {', '.join(frame.columns)}")
        frame = frame[list(dict.fromkeys(columns))]
    return frame.reset_index(drop=True)


def scored_trials(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of a trials_table with a best `metric` and no failure, in its order (best first)."""
    return frame[frame[f"best_{metric}"].notna() & ~frame["status"].isin(FAILED)]


def _column_order(rows: list[dict], exp: Experiment, metrics: list[str]) -> list[str]:
    head = list(CORE)
    for m in metrics:
        head += [f"best_{m}", f"last_{m}"] + (["best_epoch"] if m == exp.metric else [])
    head.append("baseline")
    params = list(dict.fromkeys(k for r in rows for k in r if k not in head))
    searched = [p for p in exp.searched_params() if p in params]
    return head + searched + [p for p in params if p not in searched]


def _sort_mixed(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Ascending by one column that may mix numbers, text ("native") and gaps."""
    def order(value: Any) -> tuple:
        if _missing(value):
            return (2, 0, "")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (0, value, "")
        return (1, 0, str(value))

    ranks = sorted(range(len(frame)), key=lambda i: order(frame[key].iloc[i]))
    return frame.iloc[ranks]


# --- rendering ---------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any) -> str:
    """A short, readable cell: 4 significant digits, 1.0e-04 below 0.01, "-" for none, yes/no."""
    if _missing(value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.1e}"
        return f"{value:.4g}"
    return str(value)


def fmt_score(value: Any) -> str:
    """A score with 4 decimals; "-" when there is none."""
    return "-" if _missing(value) else f"{value:.4f}"


def render(exp: Experiment, frame: pd.DataFrame, fmt_name: str = "table", width: int | None = None,
           full: bool = False, first: str | None = None) -> str:
    """The table as text: `table` fits `width` columns (the terminal's; 80 when unknown),
    showing the hyperparameter `first` (the sort column) before the others."""
    if fmt_name not in FORMATS:
        raise ConfigError(f"format {fmt_name!r} is not valid; choose one of {', '.join(FORMATS)}")
    if fmt_name == "csv":
        return frame.to_csv(index=False)
    if fmt_name == "json":
        return json.dumps(json.loads(frame.to_json(orient="records")), indent=1) + "\n"
    if fmt_name == "markdown":
        cells = [[fmt_score(v) if c.startswith(("best_v", "last_v")) else fmt(v) for c, v in row.items()]
                 for row in frame.to_dict("records")]
        return markdown_table(list(frame.columns), cells)
    return narrow_table(exp, frame, width or shutil.get_terminal_size((80, 24)).columns, full, first)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell: Any) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    align = ["---:" if rows and all(_numeric(r[i]) for r in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def status_counts(exp: Experiment) -> str:
    counts = pd.Series([t["status"] for t in exp.trials.values()], dtype=object).value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "none yet"


def narrow_table(exp: Experiment, frame: pd.DataFrame, width: int = 80, full: bool = False,
                 first: str | None = None) -> str:
    """Fixed-width text that fits `width`: id, status, epochs, best, last and the
    hyperparameters that differ between trials, as many as fit; a footer names the rest."""
    lines = [f"{exp.name}: {len(exp.trials)} trials ({status_counts(exp)}); "
             f"metric {exp.metric} ({exp.mode})"]
    if frame.empty:
        return "\n".join(lines + ["no trials to show"]) + "\n"
    custom = [c for c in frame.columns if c not in CORE and c != "baseline"]
    metric_cols = [c for c in frame.columns if c.startswith(("best_", "last_")) and c != "best_epoch"]
    cols: list[tuple[str, list[str], bool]] = []  # header, cells, right-aligned
    if "trial_id" in frame:
        marks = ["*" if b else "" for b in frame.get("baseline", [False] * len(frame))]
        cols.append(("trial", [f"{t}{m}" for t, m in zip(frame["trial_id"], marks)], False))
    if "status" in frame:
        cols.append(("status", list(frame["status"]), False))
    if "epochs" in frame:
        cols.append(("ep", [str(v) for v in frame["epochs"]], True))
    for c in metric_cols:
        head = c.split("_")[0] if c.endswith(f"_{exp.metric}") else c
        cols.append((head, [fmt_score(v) for v in frame[c]], True))
    if "best_epoch" in frame:
        cols.append(("at", [fmt(None if pd.isna(v) else int(v)) for v in frame["best_epoch"]], True))
    params = [c for c in custom if c not in metric_cols and c != "best_epoch"]
    varying = [p for p in params if full or frame[p].astype(str).nunique() > 1]
    ordered = [p for p in (first, *PRIORITY) if p in varying]
    ordered += [p for p in varying if p not in ordered]
    used = sum(max(len(h), *(len(x) for x in cells)) + 2 for h, cells, _ in cols)
    hidden, aliases = [], []
    for p in ordered:
        cells = [fmt(v) for v in frame[p]]
        head = SHORT.get(p, p)
        need = max(len(head), *(len(x) for x in cells)) + 1
        if used + need <= width or full:
            cols.append((head, cells, True))
            used += need
            if head != p:
                aliases.append(f"{head}={p}")
        else:
            hidden.append(p)
    widths = [max(len(h), *(len(x) for x in cells)) for h, cells, _ in cols]
    def line(cells: list[str]) -> str:
        out = []
        for (h, _, right), w, cell in zip(cols, widths, cells):
            out.append(cell.rjust(w) if right else cell.ljust(w))
        return " ".join(out).rstrip()
    lines.append(line([h for h, _, _ in cols]))
    for i in range(len(frame)):
        lines.append(line([cells[i] for _, cells, _ in cols]))
    notes = []
    if "trial_id" in frame and frame.get("baseline", pd.Series([False])).any():
        notes.append("* seed baseline")
    if "best_epoch" in frame:
        notes.append("at: epoch of the best")
    notes += aliases
    lines += _wrap("; ".join(notes), width)
    if hidden:
        lines += _wrap(f"not shown: {', '.join(hidden)} (use --columns, --wide or --format csv)", width)
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(width, 40), subsequent_indent="  ") if text else []


def follow(path: str | Path, draw: Callable[[Experiment], str], interval: float = 5.0,
           max_updates: int | None = None) -> Iterator[str]:
    """Yields a fresh drawing of the experiment every `interval` seconds until the search
    has finished (no trial running and as many trials as asked for), or max_updates."""
    count = 0
    while True:
        exp = load_experiment(path)
        yield draw(exp)
        count += 1
        if exp.finished() or (max_updates is not None and count >= max_updates):
            return
        time.sleep(interval)


# --- the end-of-search summary -------------------------------------------------------------


PROPORTIONS = ("val_acc", "val_one_off")  # metrics that are a share of images: Wilson intervals
PARETO_SHOWN = 8


def best_row_of(exp: Experiment, entry: dict[str, Any]) -> dict[str, Any]:
    """The result (result.json row) of a trial's best epoch; {} when there is none."""
    return next((r for r in exp.history(entry) if int(r.get("epoch", 0)) == entry.get("best_epoch")), {})


def score_with_interval(exp: Experiment, entry: dict[str, Any]) -> tuple[str, tuple[float, float] | None]:
    """A trial's best score as text with its 95 % interval (and spread across folds), and the
    interval itself when the metric is a proportion whose image count is known."""
    from .intervals import wilson

    row = best_row_of(exp, entry)
    value, n = entry["best"], row.get("val_n")
    text, interval = f"{value:.4f}", None
    if exp.metric in PROPORTIONS and n:
        interval = wilson(value, int(n))
        text += f" [95% {interval[0]:.3f}-{interval[1]:.3f} on {n} images]"
    spread = row.get(f"{exp.metric}_std")
    if row.get("cv_folds") and spread is not None:
        text += f", +/- {spread:.3f} across {row['cv_folds']} folds"
    return text, interval


def summary_lines(exp: Experiment) -> list[str]:
    """The end-of-search summary: how it validated, best and baseline with their intervals,
    whether the lead is real, failures, where to look next."""
    metric = exp.metric
    lines = []
    lines.append(f"trials: {len(exp.trials)} ({status_counts(exp)})")
    cv = exp.meta.get("cv") or {}
    if cv.get("folds", 1) > 1:
        lines.append(f"validation: {cv['folds']}-fold cross-validation of train+val ({cv.get('why', '')})")
    best = exp.best_trial()  # the model `tune-age export` writes, the seed baseline included
    base = exp.baseline_trial()
    best_interval = base_interval = None
    if best:
        which = " (the seed baseline: no searched configuration beat it)" if is_baseline(best) else ""
        text, best_interval = score_with_interval(exp, best)
        lines.append(f"best {metric}: {text} (trial {best['trial_id']}, epoch {best['best_epoch']}){which}")
        shown = {k: v for k, v in best["config"].items() if not k.startswith("_")}
        shown["epochs"] = exp.meta.get("max_epochs", shown.get("epochs"))  # what the trial trained for
        lines.append("best configuration: " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        lines.append("train it again: " + train_command(exp, shown))
        if cv.get("folds", 1) > 1:
            lines.append(f"  (train scores one train/val split; the search scored {cv['folds']} folds pooled)")
    else:
        lines.append("no trial finished with a score")
    if base:
        if base["best"] is not None:
            score, base_interval = score_with_interval(exp, base)
        else:
            score = base["status"]
        lines.append(f"seed baseline {metric}: {score} (trial {base['trial_id']})")
    searched = exp.best_trial(include_baseline=False)
    if best and is_baseline(best) and searched:
        text, _ = score_with_interval(exp, searched)
        lines.append(f"best searched trial {metric}: {text} (trial {searched['trial_id']})")
    if best and base and not is_baseline(best) and best_interval and base_interval:
        lead = best["best"] - base["best"]
        if best_interval[0] > base_interval[1] or best_interval[1] < base_interval[0]:
            lines.append(f"lead over the seed baseline: {lead:+.4f}, beyond both intervals")
        else:
            lines.append(f"lead over the seed baseline: {lead:+.4f}, within the intervals: it may be "
                         "noise (tune-age report compares the two on the test split)")
    objectives = exp.meta.get("objectives") or [metric]
    if len(objectives) > 1:
        front = pareto_front(exp)
        lines.append(f"Pareto front ({' against '.join(objectives)}; {len(front)} trial(s), measured on "
                     "each trial's own device):")
        for entry in front[:PARETO_SHOWN]:
            values = objective_values(exp, entry, objectives)
            lines.append(f"  trial {entry['trial_id']}: " + ", ".join(
                f"{name} {value:.4g}" for name, value in zip(objectives, values)))
        if front:
            second = objective_values(exp, front[-1], objectives)[1]
            lines.append(f"  export one: tune-age export {exp.path} --pick '{objectives[1]}<={second:.4g}' "
                         "--out fast.pt")
    for t in exp.failed():
        lines.append(f"trial {t['trial_id']} {t['status']} after {t['attempts']} attempt(s): {last_error(t)}")
    lines.append(f"experiment folder: {exp.path}")
    lines.append(f"next: tune-age trials {exp.path}")
    if best:  # nothing to report or export otherwise
        lines.append(f"      tune-age report {exp.path}")
        lines.append(f"      tune-age export {exp.path} --out best.pt")
    return lines


def _fmt(value: Any) -> str:
    """A value exactly as `tune-age train key=value` reads it back (YAML: a float's exponent
    needs a mantissa with a point, 1.0e-05, or it reads as text)."""
    if not isinstance(value, float):
        return str(value)
    text = repr(value)
    if "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def train_command(exp: Experiment, values: dict[str, Any]) -> str:
    """`tune-age train` on the search's data and split with these values."""
    import shlex

    from ..config import DataConfig

    data = DataConfig.from_dict(exp.meta.get("data") or {})
    default = DataConfig()
    flags = {"path": "--data", "format": "--format", "bins": "--bins", "synthetic_n": "--synthetic-n",
             "split_seed": "--split-seed", "dedupe": "--dedupe"}
    parts = ["tune-age train"]
    for name, flag in flags.items():
        value = getattr(data, name)
        if value != getattr(default, name) and not (name == "synthetic_n" and data.path):
            parts.append(f"{flag} {shlex.quote(str(value))}")
    weights_dir = (exp.meta.get("search") or {}).get("weights_dir")
    if weights_dir:
        parts.append(f"--weights-dir {shlex.quote(weights_dir)}")
    parts += [shlex.quote(f"{k}={_fmt(v)}") for k, v in values.items()]
    return " ".join(parts)
