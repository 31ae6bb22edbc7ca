"""The report of a search: which configurations work, why, and how the best model does.

    report = write_report("~/tune_age_results/search-20261128-120000")   # -> <exp>/report/
    print("\\n".join(report.summary))

or `tune-age report EXP [--rerun-top K --seeds S]`. Writes `report.md`, a self-contained
`report.html` (plots embedded as base64 PNGs) and the PNG plots (drawn by plots.py):
- the top configurations with the seed baseline's row beside them;
- parameter importance from `optuna.importance.get_param_importances` on the stored
  study (its completed search trials; too few of them is said, not hidden);
- learning curves of the top trials (their result.json), the metric against each
  searched hyperparameter, and the optimization history;
- the best checkpoint (see export.best_checkpoint) on the validation split: metrics,
  confusion matrix, per-group accuracy;
- the same model on the **test split**: the only place tune_age uses it. The split is
  rebuilt with the search's own DataConfig (tune_age.json) and checked against the
  data fingerprint and split.csv; when the data is missing or changed, the
  evaluations are skipped and the report says why;
- with `rerun_top=K`, the top K configurations retrained on the CPU with `seeds` seeds
  each and ranked by mean and spread (kept in `<exp>/rerun.json`, shown when present).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import DataConfig, TrainConfig
from ..errors import ConfigError, TuneAgeError
from .export import CheckpointRef, best_checkpoint, best_of, list_checkpoints, load_model
from .plots import plot_confusion, plot_curves, plot_groups, plot_history, plot_importance, plot_params
from .intervals import accuracy, bootstrap, paired
from .predict import METRIC_KEYS, evaluate_arrays
from . import (
    Experiment, direction, fmt, fmt_score, hyperparameters, is_baseline, last_error, load_experiment,
    markdown_table, scored_trials, status_counts, trials_table,
)
from ..search import SPLIT_FILE, same_data

progress = logging.getLogger("tune_age.progress")

RERUN_FILE = "rerun.json"
MIN_IMPORTANCE_TRIALS = 10  # fewer trials at one epoch make any importance ranking noise
CURVES = 5  # trials in the learning-curve plot
# The search metric's name in what predict.evaluate_arrays returns (training.run_epoch's renaming).
_RECOMPUTED = {"val_acc": "accuracy", "val_one_off": "one_off", "val_f1": "macro_f1",
               "val_balanced_acc": "balanced_accuracy", "val_loss": "loss", "val_mae": "mae"}


# --- a small document that renders as Markdown and as HTML -----------------------------------


class Doc:
    """Headings, paragraphs (`code` and **bold** inline), tables and images, each rendered as
    it is added: Markdown with the images linked, HTML with them embedded."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.body: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.md.append("#" * level + " " + text)
        self.body.append(f"<h{level}>{_inline(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.md.append(text)
        self.body.append(f"<p>{_inline(text)}</p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        cells = [[str(c) for c in r] for r in rows]
        self.md.append(markdown_table(header, cells).rstrip())
        head = "".join(f"<th>{_inline(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td class=\"text\">{_inline(c)}</td>" if len(c) > LONG_CELL
                                        else f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells)
        self.body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def img(self, file: Path, alt: str) -> None:
        self.md.append(f"![{alt}]({file.name})")
        data = base64.b64encode(file.read_bytes()).decode()
        self.body.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    def markdown(self) -> str:
        return "\n\n".join(self.md) + "\n"

    def html(self, title: str) -> str:
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(self.body) + "\n</body></html>\n"
        )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;"
    "color:#222;overflow-wrap:anywhere}table{border-collapse:collapse;margin:1rem 0;font-size:.9rem;"
    "max-width:100%}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right;white-space:nowrap}"
    "td.text{white-space:normal;text-align:left}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}code{background:#f3f3f3;padding:0 .2rem}"
    "img{max-width:100%;height:auto}figure{margin:1rem 0}figcaption{color:#666;font-size:.85rem}"
)
LONG_CELL = 32  # characters: a longer cell (an error, a path) wraps; numbers never do


def _inline(text: str) -> str:
    text = html.escape(str(text).replace("\\|", "|"))
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


# --- parameter importance --------------------------------------------------------------------


def rung_epochs(exp: Experiment) -> list[int]:
    """The epochs at which ASHA compares trials (its rungs), deepest first, and the last epoch."""
    top = int(exp.meta.get("max_epochs") or 1)
    grace, factor = int(exp.meta.get("grace_period") or 1), float(exp.meta.get("reduction_factor") or 3)
    rungs, epoch = {top}, grace
    while epoch < top:
        rungs.add(int(epoch))
        epoch *= factor
    return sorted(rungs, reverse=True)


def param_importance(exp: Experiment) -> tuple[dict[str, float] | None, str]:
    """(importances, a sentence for the report); None with the reason when it cannot be had.

    Over the trials at the deepest rung that at least MIN_IMPORTANCE_TRIALS search trials
    reached, pruned ones included, each scored by its value at that epoch: over completed
    trials only, a parameter that gets trials pruned (a learning rate too high) would look
    unimportant."""
    url = exp.study_url
    if url.startswith("sqlite:") and not exp.study_path.is_file():
        return None, f"No Optuna study ({exp.study_path.name}) in the experiment folder."
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=exp.name, storage=url)
    except Exception as exc:  # a damaged study.db, or one of another search
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        from ..search.study import describe

        return None, f"The Optuna study at {describe(url)} could not be read: {why}"
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
              if t.params and not t.user_attrs.get("baseline")]

    def value_at(t, epoch: int) -> float | None:  # a multi-objective study: the metric's, from epoch_values
        if epoch in t.intermediate_values:
            return t.intermediate_values[epoch]
        values = t.user_attrs.get("epoch_values", {}).get(str(epoch))
        return values[0] if values else None

    reached = {epoch: [t for t in trials if value_at(t, epoch) is not None] for epoch in rung_epochs(exp)}
    epoch = next((e for e, ts in reached.items() if len(ts) >= MIN_IMPORTANCE_TRIALS), None)
    if epoch is None:
        most = max((len(ts) for ts in reached.values()), default=0)
        return None, (
            f"Too few trials to estimate parameter importance: at most {most} search trial(s) reached "
            f"any of the epochs where ASHA compares them ({', '.join(map(str, sorted(reached)))}), at "
            f"least {MIN_IMPORTANCE_TRIALS} needed. Run more trials (`--num-samples`)."
        )
    scored = reached[epoch]
    copy = optuna.create_study(direction=study.directions[0])
    copy.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                               value=value_at(t, epoch)) for t in scored])
    # PED-ANOVA (Optuna's default) compares the top share of trials with all: at least 3 of them.
    quantile = max(0.1, 3 / len(scored))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                copy, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile))
    except Exception as exc:  # e.g. conditional parameters present in too few trials
        return None, f"Parameter importance could not be computed: {exc}"
    pruned = sum(t.state == TrialState.PRUNED for t in scored)
    return dict(importances), (
        f"From {len(scored)} search trials at epoch {epoch} ({pruned} of them later stopped by ASHA), "
        f"each scored by its {exp.metric} at that epoch; PED-ANOVA (Optuna's default evaluator) "
        f"comparing the top {quantile:.0%} with all. With few trials these are rough."
    )


# --- evaluating the best model ---------------------------------------------------------------


def per_group_accuracy(confusion: list[list[int]]) -> list[float | None]:
    """The share of each true group (row) predicted right; None for a group with no images."""
    counts = np.asarray(confusion)
    return [None if row.sum() == 0 else float(row[i] / row.sum()) for i, row in enumerate(counts)]


def load_search_data(exp: Experiment, sizes: list[int | str]):
    """The search's data and split, rebuilt from tune_age.json; (data, None) or (None, why)."""
    from ..data import load_data

    try:
        data = load_data(DataConfig.from_dict(exp.meta["data"]), sizes, progress=False)
    except TuneAgeError as exc:
        return None, f"the search's data could not be loaded ({exc})"
    if not same_data(exp.meta, data):
        return None, ("the data changed since the search (its fingerprint differs), so the "
                      "split would not be the search's")
    split_file = exp.path / SPLIT_FILE
    if split_file.is_file() and data.fingerprint == exp.meta.get("data_fingerprint"):
        # (read elsewhere, the same images have other paths: their content fingerprint, which
        # holds each image's split, has matched instead)
        saved = pd.read_csv(split_file)
        now = data.split_table()
        if list(saved["path"]) != list(now["path"]) or list(saved["split"]) != list(now["split"]):
            return None, f"the rebuilt split does not match {SPLIT_FILE}"
    return data, None


def evaluate_checkpoint(ref: CheckpointRef, data, splits=("val", "test")) -> dict[str, Any]:
    """predict.evaluate_arrays of the checkpoint on each non-empty split of `data`, with the
    95 % bootstrap interval of accuracy and how many of the split's images the model saw."""
    loaded = load_model(ref.path)
    images = data.images[loaded.image_size]
    keys = data.keys.get(loaded.image_size)
    out = {}
    for split in splits:
        rows = data.splits[split]
        if len(rows):
            m = evaluate_arrays(loaded, images[rows], data.labels[rows], data.ages[rows])
            m["target"] = data.labels[rows]
            m["accuracy_ci"] = bootstrap(m["pred"], m["target"], accuracy)
            m["seen_here"] = (int(np.isin(keys[rows], np.fromiter(loaded.seen, dtype=np.int64)).sum())
                              if loaded.seen is not None and keys is not None else None)
            out[split] = m
    return out


# --- seed reruns -----------------------------------------------------------------------------


def rerun_top(exp: Experiment, k: int, seeds: int, data=None) -> dict[str, Any]:
    """Retrains the top k configurations with `seeds` seeds each on the CPU for the search's
    max_epochs; ranks them by the mean of each run's best metric (then the smaller spread).
    Writes and returns `<exp>/rerun.json`."""
    from ..training.engine import Diverged
    from ..search.tracking import write_json_atomic
    from ..training import run_epoch, start_run

    if k < 1 or seeds < 1:
        raise ConfigError(f"--rerun-top {k} --seeds {seeds}: both must be 1 or more")
    metric, max_epochs = exp.metric, int(exp.meta["max_epochs"])
    sign = direction(metric)
    entries = [exp.trials[t] for t in scored_trials(trials_table(exp), metric)["trial_id"].head(k)]
    if not entries:
        raise TuneAgeError(f"{exp.path}: no trial has a score yet; nothing to rerun")
    configs = [TrainConfig.from_dict({**hyperparameters(t), "epochs": max_epochs, "device": "cpu",
                                      "amp": False}) for t in entries]
    if data is None:
        data, why = load_search_data(exp, sorted({c.image_size for c in configs}, key=str))
        if data is None:
            raise TuneAgeError(f"cannot rerun: {why}")
    results = []
    for entry, cfg in zip(entries, configs):
        scores = []
        for seed in range(seeds):
            run = start_run(cfg.replace(seed=seed), data)  # cfg.device is "cpu"
            values = []
            try:
                for _ in range(max_epochs):
                    values.append(run_epoch(run)[metric])
            except Diverged:
                values = []
            score = max(values, key=lambda v: sign * v) if values else None
            scores.append(score)
            progress.info(f"rerun trial {entry['trial_id']} seed {seed}: "
                          f"{metric} {'diverged' if score is None else f'{score:.4f}'}")
        finite = [s for s in scores if s is not None]
        results.append({
            "trial_id": entry["trial_id"], "baseline": is_baseline(entry),
            "search_best": entry["best"], "scores": scores,
            "mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "diverged": len(scores) - len(finite),
        })
    results.sort(key=lambda r: (r["mean"] is None, -sign * (r["mean"] or 0), r["std"] or 0))
    out = {"metric": metric, "mode": exp.mode, "seeds": list(range(seeds)), "max_epochs": max_epochs,
           "data_fingerprint": data.fingerprint, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "configs": results}
    write_json_atomic(exp.path / RERUN_FILE, out)
    return out


def _read_rerun(exp: Experiment) -> dict[str, Any] | None:
    """The kept `<exp>/rerun.json` of an earlier `--rerun-top`; None when there is none."""
    file = exp.path / RERUN_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TuneAgeError(f"{file}: not valid JSON ({exc.msg}, line {exc.lineno}); delete it, "
                           "or make a new one with --rerun-top K") from None


# --- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    markdown: Path
    html: Path
    plots: list[Path] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # short lines for the terminal


def write_report(
    exp_dir: str | Path,
    out: str | Path | None = None,
    top: int = 5,
    rerun_top_k: int = 0,
    seeds: int = 3,
    evaluate: bool = True,
) -> Report:
    """Writes report.md, report.html and the plots into `out` (default `<exp>/report`):
    the `top` configurations; with `rerun_top_k`, seed reruns first (see rerun_top);
    `evaluate=False` skips the best model's validation and test sections."""
    if top < 1:
        raise ConfigError(f"--top {top} is not valid; give 1 or more")
    exp = load_experiment(exp_dir)
    out = Path(out).expanduser() if out else exp.path / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, or a read-only experiment folder
        raise TuneAgeError(f"cannot write the report to {out}: {exc.strerror}; choose --out DIR") from None
    doc, summary = Doc(), []
    frame = trials_table(exp)
    searched = [p for p in exp.searched_params() if p in frame.columns]
    scored = scored_trials(frame, exp.metric)
    base = frame[frame["baseline"]]

    doc.h(1, f"Search report: {exp.name}")
    doc.p(f"Experiment `{exp.path}`, started {exp.meta.get('created', '?')}; report written "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}.")
    doc.p(f"Data: {exp.meta.get('data_source', '?')}; age groups {', '.join(exp.meta['groups']['names'])}. "
          f"Space `{exp.meta['space']['name']}` ({len(searched)} searched parameters), "
          f"{exp.meta['num_samples']} trials of up to {exp.meta['max_epochs']} epochs. "
          f"Metric **{exp.metric}** ({exp.mode}). Trials: {status_counts(exp)}.")
    cv = exp.meta.get("cv") or {}
    if cv.get("folds", 1) > 1:
        doc.p(f"Validation: each trial trained {cv['folds']} folds of train+val and was scored on their "
              f"pooled predictions ({cv.get('why', '')}); the test split is in no fold.")
    _best_section(exp, scored, base, searched, top, doc, summary)
    plots = _importance_section(exp, doc, summary, out)
    plots += _pareto_section(exp, doc, summary, out)
    if exp.trials:
        plots += _trial_plots(exp, frame, scored, base, searched, doc, out)
    if evaluate:
        plots += _model_sections(exp, doc, summary, out)
    rerun = rerun_top(exp, rerun_top_k, seeds) if rerun_top_k else _read_rerun(exp)
    if rerun:
        _rerun_section(exp, rerun, doc, summary)
    failed = exp.failed()
    if failed:
        doc.h(2, "Failed trials")
        doc.table(["trial", "status", "attempts", "last error"],
                  [[t["trial_id"], t["status"], t["attempts"], last_error(t)] for t in failed])

    md, page = out / "report.md", out / "report.html"
    md.write_text(doc.markdown())
    page.write_text(doc.html(f"tune_age report: {exp.name}"))
    summary.insert(0, f"report: {md} and {page} ({len(plots)} plots)")
    return Report(md, page, plots, summary)


def _best_section(exp: Experiment, scored: pd.DataFrame, base: pd.DataFrame, searched: list[str],
                  top: int, doc: Doc, summary: list[str]) -> None:
    """The best configurations, the seed baseline beside them."""
    metric = exp.metric
    doc.h(2, "Best configurations")
    shown = scored.head(top)
    if not base.empty and base["trial_id"].iloc[0] not in set(shown["trial_id"]):
        shown = pd.concat([shown, base])
    if shown.empty:
        doc.p("No trial has a score yet.")
        return
    rank = {t: i for i, t in enumerate(scored["trial_id"], 1)}
    records = shown.to_dict("records")
    # One column per trial, one row per field: as many searched parameters as a space has
    # still fit the page, and every value stays on one line.
    columns = [r["trial_id"] + (" (seed baseline)" if r["baseline"] else "") for r in records]
    fields = [("rank", lambda r: rank.get(r["trial_id"], "-")), ("status", lambda r: r["status"]),
              ("epochs", lambda r: r["epochs"]), (f"best {metric}", lambda r: fmt_score(r[f"best_{metric}"])),
              ("at epoch", lambda r: fmt(None if pd.isna(r["best_epoch"]) else int(r["best_epoch"]))),
              (f"last {metric}", lambda r: fmt_score(r[f"last_{metric}"]))]
    fields += [(p, lambda r, p=p: fmt(r[p])) for p in searched]
    doc.table([""] + columns, [[name] + [get(r) for r in records] for name, get in fields])
    doc.p("The seed baseline is the original notebook's configuration, trained the same way; "
          "its values of the searched parameters are its own, outside the space where they differ.")
    if not scored.empty:
        best = scored.iloc[0]
        summary.append(f"best {metric}: {best[f'best_{metric}']:.4f} (trial {best['trial_id']}, "
                       f"epoch {int(best['best_epoch'])})")
    if not base.empty and pd.notna(base[f"best_{metric}"].iloc[0]):
        summary.append(f"seed baseline {metric}: {base[f'best_{metric}'].iloc[0]:.4f}")


def _pareto_section(exp: Experiment, doc: Doc, summary: list[str], out: Path) -> list[Path]:
    """A multi-objective search: its Pareto front, as a table and a figure."""
    from . import objective_values, pareto_front
    from .plots import plot_pareto

    objectives = exp.meta.get("objectives") or [exp.metric]
    if len(objectives) < 2:
        return []
    doc.h(2, "Accuracy against " + ", ".join(objectives[1:]))
    front = pareto_front(exp)
    doc.p(f"The trials no other trial beats on every objective: {len(front)} of {len(exp.trials)}. "
          f"{exp.metric} is the trial's best epoch's; latencies are medians on the trial's own device "
          "(batch 1 and 64, after warm-up; trials running at once share the machine). "
          "`tune-age export EXP --pick \"latency_ms<=5\"` exports the most accurate trial within a limit.")
    doc.table(["trial", *objectives], [[e["trial_id"], *(f"{v:.4g}" for v in objective_values(exp, e, objectives))]
                                       for e in front])
    png = plot_pareto(exp, objectives, front, out / "pareto.png")
    doc.img(png, "Pareto front")
    summary.append(f"Pareto front: {len(front)} trial(s) over {', '.join(objectives)}")
    return [png]


def _importance_section(exp: Experiment, doc: Doc, summary: list[str], out: Path) -> list[Path]:
    doc.h(2, "Parameter importance")
    importances, note = param_importance(exp)
    doc.p(note)
    if not importances:
        reason = note.split(":")[0].split(". ")[0].rstrip(".")  # the note's first clause
        summary.append(f"parameter importance: not estimated ({reason[0].lower()}{reason[1:]})")
        return []
    doc.table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.items()])
    png = plot_importance(importances, out / "importance.png")
    doc.img(png, "Parameter importance")
    top3 = ", ".join(f"{k} {v:.2f}" for k, v in list(importances.items())[:3])
    basis = note.split(" (")[0].replace("From ", "")  # "N search trials at epoch E"
    summary.append(f"most important ({basis}): {top3}")
    return [png]


def _trial_plots(exp: Experiment, frame: pd.DataFrame, scored: pd.DataFrame, base: pd.DataFrame,
                 searched: list[str], doc: Doc, out: Path) -> list[Path]:
    """Learning curves of the top trials, the metric against each parameter, the history."""
    plots = []
    doc.h(2, "Learning curves")
    entries = [exp.trials[t] for t in scored["trial_id"].head(CURVES)]
    if not base.empty and base["trial_id"].iloc[0] not in {t["trial_id"] for t in entries}:
        entries.append(exp.trials[base["trial_id"].iloc[0]])
    entries = [t for t in entries if exp.history(t)]
    if entries:
        plots.append(plot_curves(exp, entries, out / "learning_curves.png"))
        doc.img(plots[-1], f"Learning curves of the top {len(entries)} trials (from result.json)")
    else:
        doc.p("No scored trial has reported an epoch in its result.json yet.")
    doc.h(2, f"{exp.metric} against each hyperparameter")
    params_png = plot_params(exp, frame, searched, out / "params.png")
    if params_png:
        plots.append(params_png)
        doc.img(params_png, f"best {exp.metric} of each search trial against each searched hyperparameter")
    else:
        doc.p("No search trial has a score yet." if searched else "The space searched no hyperparameters.")
    doc.h(2, "Optimization history")
    plots.append(plot_history(exp, out / "history.png"))
    doc.img(plots[-1], "Optimization history: each trial's best score and the best so far")
    return plots


def _metrics_rows(named: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in METRIC_KEYS + ("loss",) if any(k in m for m in named.values())]
    def ci(m: dict[str, Any]) -> str:
        low, high = m.get("accuracy_ci", (None, None))
        return "-" if low is None else f"{low:.3f}-{high:.3f}"
    return ["model"] + keys + ["accuracy 95% interval", "images"], [
        [name] + [fmt_score(m.get(k)) for k in keys] + [ci(m), str(m["n_images"])] for name, m in named.items()
    ]


def _paired_lines(best: dict[str, Any], base: dict[str, Any]) -> str:
    """Best against the seed baseline on the same images: the paired bootstrap of accuracy."""
    diff, low, high = paired(best["pred"], base["pred"], best["target"], accuracy)
    verdict = ("the best model is better on images like these" if low > 0 else
               "the seed baseline is better on images like these" if high < 0 else
               "the interval includes 0: on this many images the difference may be noise")
    return (f"Best minus seed baseline, accuracy on the same {len(best['target'])} test images: "
            f"{diff:+.4f} (95% paired bootstrap interval {low:+.4f} to {high:+.4f}); {verdict}.")


def _model_sections(exp: Experiment, doc: Doc, summary: list[str], out: Path) -> list[Path]:
    doc.h(2, "The best model on the validation split")
    try:
        ref = best_checkpoint(exp)
    except TuneAgeError as exc:
        doc.p(f"Not evaluated: {exc}")
        return []
    base_ref = best_of([r for r in list_checkpoints(exp) if r.baseline], exp.metric)
    data, why = load_search_data(exp, sorted({r.image_size for r in (ref, base_ref) if r is not None}))
    doc.p(f"The best checkpoint over every epoch kept of every trial: trial `{ref.trial_id}`"
          f"{' (the seed baseline)' if ref.baseline else ''}, epoch {ref.epoch} "
          f"(`{ref.path.relative_to(exp.path)}`), which stored {exp.metric} {ref.value(exp.metric):.4f}.")
    if data is None:
        doc.p(f"Not evaluated: {why}.")
        doc.h(2, "Test split")
        doc.p(f"Not evaluated: {why}.")
        summary.append(f"best model not evaluated: {why}")
        return []
    result = evaluate_checkpoint(ref, data)
    plots = []
    names = data.groups.names
    val = result["val"]
    header, rows = _metrics_rows({"best": val})
    doc.table(header, rows)
    again, stored = val.get(_RECOMPUTED[exp.metric]), ref.value(exp.metric)
    if again is not None and stored is not None and abs(again - stored) > 1e-4:
        doc.p(f"Note: recomputed here, {exp.metric} is {again:.4f}, not the {stored:.4f} the "
              "checkpoint stored; the model or the data differ from the search's.")
    plots.append(plot_confusion(names, val["confusion"], "Confusion matrix, validation split",
                                out / "confusion_val.png"))
    doc.img(plots[-1], "Confusion matrix of the best model on the validation split (rows: true group)")
    series = {"validation": per_group_accuracy(val["confusion"])}
    counts = np.asarray(val["confusion"]).sum(1)
    group_rows = [[n, int(c), fmt_score(a)] for n, c, a in zip(names, counts, series["validation"])]

    doc.h(2, "Test split")
    test = result.get("test")
    if test is None:
        doc.p("The search's data has no test split (test_fraction=0).")
    else:
        named = {f"best (trial {ref.trial_id}, epoch {ref.epoch})": test}
        base_test = None
        if base_ref is not None and base_ref.path != ref.path:
            base_test = evaluate_checkpoint(base_ref, data, ("test",))["test"]
            named[f"seed baseline (trial {base_ref.trial_id}, epoch {base_ref.epoch})"] = base_test
        seen = test.get("seen_here")
        doc.p("The test split is used only here, once the search is over: no trial, "
              "checkpoint choice or ranking has seen it"
              + (f" ({seen} of its {test['n_images']} images are among the model's training and "
                 "validation images, checked by their pixels)." if seen is not None else "."))
        header, rows = _metrics_rows(named)
        doc.table(header, rows)
        if base_test is not None:
            doc.p(_paired_lines(test, base_test))
            summary.append(_paired_lines(test, base_test).rstrip("."))
        plots.append(plot_confusion(names, test["confusion"], "Confusion matrix, test split",
                                    out / "confusion_test.png"))
        doc.img(plots[-1], "Confusion matrix of the best model on the test split")
        series["test"] = per_group_accuracy(test["confusion"])
        tcounts = np.asarray(test["confusion"]).sum(1)
        group_rows = [r + [int(c), fmt_score(a)] for r, c, a in zip(group_rows, tcounts, series["test"])]
        low, high = test["accuracy_ci"]
        summary.append(f"test split (best model): accuracy {test['accuracy']:.4f} [95% {low:.3f}-{high:.3f}], one_off "
                       f"{test['one_off']:.4f}, macro_f1 {test['macro_f1']:.4f}")
    doc.h(3, "Per-group accuracy")
    doc.table(["group", "val images", "val accuracy"] + (["test images", "test accuracy"] if test else []),
              group_rows)
    plots.append(plot_groups(names, series, out / "per_group.png"))
    doc.img(plots[-1], "Accuracy within each age group")
    plots += _calibration_section(exp, ref, data, doc, summary, out)
    if test is not None:
        plots += _people_section(data, test, doc, summary, out)
    return plots


def _calibration_section(exp: Experiment, ref: CheckpointRef, data, doc: Doc, summary: list[str],
                         out: Path) -> list[Path]:
    """How far the best model's confidence is from its accuracy, on validation and test,
    as trained and after temperature scaling fitted on validation (what export --calibrate
    does); not fitted where the model trained on validation images (cross-validation)."""
    import torch

    from ..training.engine import predict_logits
    from .calibration import ECE_BINS, calibration_figures, reliability
    from .plots import plot_reliability

    doc.h(2, "Calibration")
    loaded = load_model(ref.path)
    logits = {}
    for split in ("val", "test"):
        rows = data.splits[split]
        if len(rows):
            images = torch.from_numpy(np.ascontiguousarray(data.images[loaded.image_size][rows]))
            z = predict_logits(loaded.model, images, norm=loaded.normalizer()).float().cpu() / loaded.temperature
            logits[split] = (z, torch.from_numpy(np.asarray(data.labels[rows], dtype=np.int64)))
    folds = int((exp.meta.get("cv") or {}).get("folds", 1) or 1)
    fit = folds == 1 and "val" in logits
    figures = calibration_figures(logits, fit=fit)
    t = figures["temperature"]
    names = {"val": "validation", "test": "test"}
    rows = [[names[split], figures[f"{split}_n"], f"{figures[f'{split}_ece'][0]:.4f}",
             f"{figures[f'{split}_ece'][1]:.4f}" if fit else "-", f"{figures[f'{split}_nll'][0]:.4f}",
             f"{figures[f'{split}_nll'][1]:.4f}" if fit else "-"] for split in logits]
    doc.table(["split", "images", "ECE as trained", "ECE scaled", "NLL as trained", "NLL scaled"], rows)
    if fit:
        doc.p(f"Expected calibration error ({ECE_BINS} equal-width confidence bins) and negative log-likelihood "
              f"of the best model, as trained and with its logits divided by a temperature of {t:.3f} fitted "
              "on the validation split (so its validation figures after scaling are in-sample; the test "
              "split is the honest one). `tune-age export EXP --calibrate` puts this temperature inside the "
              "exported model, so the probabilities `predict` prints are the scaled ones.")
    else:
        doc.p(f"Expected calibration error and negative log-likelihood of the best model as trained. No "
              f"temperature is fitted: the trial cross-validated {folds} folds, so its model trained on part "
              "of the validation split, where the temperature would be fitted.")
    curves = {}
    for split, (z, y) in logits.items():
        curves[f"{names[split]}, as trained"] = reliability(z.softmax(1), y)
        if fit and split == "test":
            curves[f"{names[split]}, temperature {t:.2f}"] = reliability((z / t).softmax(1), y)
    png = plot_reliability(curves, out / "reliability.png")
    doc.img(png, "Reliability diagram: accuracy against confidence per confidence bin (marker size: images)")
    split = "test" if "test" in logits else "val"
    ece = figures[f"{split}_ece"]
    summary.append(f"calibration on {names[split]}: ECE {ece[0]:.4f} as trained"
                   + (f", {ece[1]:.4f} at temperature {t:.3f} (fitted on validation)" if fit else ""))
    return [png]


def _people_section(data, test: dict[str, Any], doc: Doc, summary: list[str], out: Path) -> list[Path]:
    """Accuracy by gender, race and age group of the best model on the test split, where the
    data says who is in each photo (a CSV's columns, UTKFace names)."""
    from .plots import plot_people
    from .predict import MIN_GAP_IMAGES, group_accuracy

    doc.h(2, "Accuracy by group of people")
    rows = data.splits["test"]
    people = data.people().iloc[rows].reset_index(drop=True)
    known = [name for name in ("gender", "race") if people[name].astype(bool).any()]
    if not known:
        doc.p(f"The data ({data.layout or 'its layout'}) does not say the gender or race of the people in its "
              "photos (a CSV's `gender` and `race` columns, or UTKFace names, would); by age group see above.")
        return []
    pred, labels = test["pred"], test["target"]
    by = group_accuracy(people, known + ["age_group"], data.groups, pred, labels, data.ages[rows],
                        data.root or data.source)
    doc.p(f"The best model on the test split's {len(rows)} images, per group of people: accuracy, one-off "
          "accuracy (within one age group) and mean absolute error of the predicted group's centre, with "
          f"95% Wilson intervals. The largest gap is between groups of {MIN_GAP_IMAGES} or more images.")
    for name, part in by.items():
        doc.h(3, f"By {name.replace('_', ' ')}")
        doc.table([name, "images", "accuracy", "95% interval", "one-off", "MAE (years)"],
                  [[value, r["n"], f"{r['accuracy']:.3f}", f"{r['accuracy_ci'][0]:.3f}-{r['accuracy_ci'][1]:.3f}",
                    f"{r['one_off']:.3f}", "-" if r["mae"] is None else f"{r['mae']:.1f}"]
                   for value, r in part["values"].items()])
        if part["unknown"]:
            doc.p(f"{part['unknown']} image(s) with no {name} known are in no row.")
        gap = part["largest_gap"]
        if gap:
            sure = ("beyond both intervals" if gap["beyond_intervals"]
                    else "within the intervals, so on this many images it may be noise")
            line = (f"Largest gap by {name}: {gap['accuracy_gap']:.3f} in accuracy ({gap['highest']} over "
                    f"{gap['lowest']}), {sure}.")
            doc.p(line)
            if name != "age_group":
                summary.append(line.rstrip("."))
        else:
            doc.p(f"No gap by {name} is named: fewer than two of its groups have {MIN_GAP_IMAGES} images.")
    png = plot_people(by, out / "people.png")
    doc.img(png, "Accuracy of the best model on the test split by group of people (count in brackets)")
    return [png]


def _rerun_section(exp: Experiment, rerun: dict[str, Any], doc: Doc, summary: list[str]) -> None:
    doc.h(2, "Seed reruns")
    seeds = rerun["seeds"]
    doc.p(f"The top {len(rerun['configs'])} configurations retrained on the CPU with seeds "
          f"{', '.join(map(str, seeds))} for {rerun['max_epochs']} epochs each, ranked by the mean "
          f"of each run's best {rerun['metric']} (then the smaller spread), so that a lucky trial "
          f"does not win. Run {rerun['created']}.")
    if rerun.get("data_fingerprint") != exp.meta.get("data_fingerprint"):
        doc.p("Note: these reruns used data that differs from the search's.")
    rows = [[i, r["trial_id"] + (" (seed baseline)" if r["baseline"] else ""), fmt_score(r["mean"]),
             fmt_score(r["std"]), ", ".join(fmt_score(s) for s in r["scores"]), fmt_score(r["search_best"]),
             r["diverged"]] for i, r in enumerate(rerun["configs"], 1)]
    doc.table(["rank", "trial", "mean", "std", "per seed", "search best", "diverged"], rows)
    first = rerun["configs"][0]
    if first["mean"] is not None:
        spread = f" +- {first['std']:.4f}" if first["std"] is not None else ""
        summary.append(f"rerun winner: trial {first['trial_id']} {rerun['metric']} "
                       f"{first['mean']:.4f}{spread} over {len(seeds)} seeds")
