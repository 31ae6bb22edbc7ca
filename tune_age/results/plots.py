"""The report's figures, as PNG files: matplotlib on an experiment, its trials table and
the best model's confusion matrices.

    plot_history(exp, out / "history.png")                 # best score per trial, best so far
    plot_curves(exp, entries, out / "learning_curves.png") # metric and losses per epoch
    plot_params(exp, trials_table(exp), ["lr"], out / "params.png")
    plot_importance({"lr": 0.7, "dropout": 0.3}, out / "importance.png")
    plot_confusion(names, confusion, "validation", out / "confusion_val.png")
    plot_groups(names, {"validation": [0.8, ...]}, out / "per_group.png")
    plot_reliability({"test, as trained": points}, out / "reliability.png")
    plot_people(by_group, out / "people.png")

Each function writes one file and returns its path (plot_params: None when there is
nothing to plot). They draw on matplotlib's Agg canvas through `Figure`, never pyplot,
so no display is needed; report.py puts them in report.md and report.html.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import FAILED, Experiment, direction, is_baseline

DPI = 90


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_x(ax, values: list[float]) -> None:
    """A log x axis with at most 4 labels that never overlap: whole decades where the values
    span two or more, else the smallest and largest value."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = min(values), max(values)
    if math.floor(math.log10(high)) - math.ceil(math.log10(low)) >= 1:
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=4))
    else:
        ticks = [low, high] if high > low else [low]
        ax.set_xticks(ticks, [f"{v:.1e}" for v in ticks], fontsize="small")


def _save(fig, file: Path) -> Path:
    fig.savefig(file, format="png")
    return file


def plot_history(exp: Experiment, file: Path) -> Path:
    """Each trial's best metric in start order, the running best, the baseline starred."""
    trials = sorted(exp.trials.values(), key=lambda t: t.get("started") or 0)
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    sign = direction(exp.metric)
    running, best = [], None
    for i, t in enumerate(trials, 1):
        value = t["best"]
        if value is not None and t["status"] not in FAILED:
            best = value if best is None or sign * value > sign * best else best
            marker = "*" if is_baseline(t) else "o"
            color = "tab:blue" if t["status"] == "completed" else "tab:gray"
            ax.scatter([i], [value], marker=marker, s=90 if marker == "*" else 30, color=color, zorder=3)
        running.append(best)
    ax.plot(range(1, len(trials) + 1), [np.nan if r is None else r for r in running],
            color="tab:orange", drawstyle="steps-post", label="best so far")
    _integer_x(ax)
    ax.set_xlabel("trial (in start order); gray: stopped early, star: seed baseline")
    ax.set_ylabel(f"best {exp.metric}")
    ax.set_title("Optimization history")
    ax.legend(loc="best")
    return _save(fig, file)


def plot_curves(exp: Experiment, entries: list[dict[str, Any]], file: Path) -> Path:
    """The metric and the losses per epoch of the given trials."""
    fig = _figure(10, 3.8)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, t in enumerate(entries):
        rows = [r for r in exp.history(t) if not r.get("diverged")]
        if not rows:
            continue
        color = f"C{i % 10}"
        label = t["trial_id"] + (" (baseline)" if is_baseline(t) else "")
        epochs = [r.get("epoch") for r in rows]
        left.plot(epochs, [r.get(exp.metric) for r in rows], marker="o", color=color, label=label)
        right.plot(epochs, [r.get("train_loss") for r in rows], color=color, linestyle="--")
        right.plot(epochs, [r.get("val_loss") for r in rows], color=color, marker="o")
    losses = [v for line in right.get_lines() for v in line.get_ydata() if v is not None and v > 0]
    if losses and max(losses) > 20 * min(losses):  # one runaway trial would flatten the rest
        right.set_yscale("log")
    for ax in (left, right):
        _integer_x(ax)
    left.set(xlabel="epoch", ylabel=exp.metric, title=f"{exp.metric} of the top trials")
    right.set(xlabel="epoch", ylabel="loss", title="val loss (solid) and train loss (dashed)")
    if left.get_lines():
        left.legend(fontsize="small")
    return _save(fig, file)


def plot_params(exp: Experiment, frame: pd.DataFrame, params: list[str], file: Path) -> Path | None:
    """The best metric of each search trial (rows of trials_table) against each searched
    hyperparameter; None when no search trial has a score or nothing was searched."""
    col = f"best_{exp.metric}"
    rows = frame[~frame["baseline"] & frame[col].notna()]
    if rows.empty or not params:
        return None
    base = frame[frame["baseline"] & frame[col].notna()]
    specs = exp.meta.get("space", {}).get("values", {}).get("params", {})
    ncols = min(4, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig = _figure(3.1 * ncols, 2.6 * nrows)
    colors = ["tab:blue" if s == "completed" else "tab:gray" for s in rows["status"]]
    for i, name in enumerate(params, 1):
        ax = fig.add_subplot(nrows, ncols, i)
        has = rows[name].notna()  # a conditional parameter: only the trials that sampled it
        values, scores = rows[name][has].tolist(), rows[col][has]
        shade = [c for c, h in zip(colors, has) if h]
        spec = specs.get(name) or {}
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if values and numeric and "choice" not in spec:
            ax.scatter(values, scores, c=shade, s=20)
            distinct = sorted(set(values))
            if "loguniform" in spec and min(values) > 0:
                _log_x(ax, values)
            elif all(isinstance(v, int) for v in values):
                if len(distinct) <= 8:
                    ax.set_xticks(distinct, [str(v) for v in distinct], fontsize="small")  # the values tried
                else:
                    _integer_x(ax)
        elif values:  # a choice: its values side by side, in the space's order, evenly spaced
            choices = spec.get("choice", [])
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in choices):
                choices = sorted(choices)
            order = [str(v) for v in choices]
            labels = [v for v in order if v in {str(x) for x in values}] or sorted({str(v) for v in values})
            labels += sorted({str(v) for v in values} - set(labels))  # a baseline value outside the space
            ax.scatter([labels.index(str(v)) for v in values], scores, c=shade, s=20)
            ax.set_xticks(range(len(labels)), labels, fontsize="small")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        if not base.empty:
            ax.axhline(base[col].iloc[0], color="tab:red", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize="medium")
        if (i - 1) % ncols == 0:
            ax.set_ylabel(f"best {exp.metric}")
    fig.suptitle("metric against each hyperparameter (gray: stopped early; red line: seed baseline)",
                 fontsize="medium")
    return _save(fig, file)


def plot_importance(importances: dict[str, float], file: Path) -> Path:
    """Horizontal bars, the most important parameter on top."""
    names = list(importances)[::-1]
    fig = _figure(6, 0.35 * len(names) + 1.2)
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance", title="Parameter importance")
    return _save(fig, file)


def plot_confusion(names: list[str], confusion: list[list[int]], title: str, file: Path) -> Path:
    """Each cell's count and share of its true group (row), shaded by that share on a
    labelled colour bar; each row's image count beside its name, so that a row of one image
    is not read as one of many."""
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(1)
    share = counts / np.maximum(totals[:, None], 1)
    fig = _figure(0.8 * len(names) + 3.4, 0.6 * len(names) + 2)
    ax = fig.add_subplot()
    shade = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(counts):
        if n:
            ax.text(c, r, f"{int(n)}\n{share[r, c]:.0%}", ha="center", va="center", fontsize="x-small",
                    color="white" if share[r, c] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(names)), [f"{n} (n={int(t)})" for n, t in zip(names, totals)], fontsize="small")
    ax.set(xlabel="predicted group", ylabel="true group (images)", title=title)
    fig.colorbar(shade, ax=ax, label="share of the true group's images", shrink=0.8)
    return _save(fig, file)


def plot_reliability(curves: dict[str, list[tuple[float, float, int]]], file: Path) -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per
    curve (see calibration.reliability), marker area by the bin's images; the diagonal is a
    model whose confidence is its accuracy."""
    fig = _figure(5.2, 4.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", label="calibrated")
    for i, (label, points) in enumerate(curves.items()):
        if not points:
            continue
        conf, acc, n = (np.asarray(v) for v in zip(*points))
        ax.plot(conf, acc, color=f"C{i}", label=label)
        ax.scatter(conf, acc, s=12 + 120 * n / n.max(), color=f"C{i}", alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability, bin mean)",
           ylabel="accuracy in the bin", title="Reliability of the best model")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, file)


def plot_people(by: dict[str, Any], file: Path) -> Path:
    """Accuracy per value of each attribute (evaluate's by_group), with its 95 % interval and
    count, one panel per attribute."""
    fig = _figure(3.6 * len(by), 3.6)
    for i, (name, part) in enumerate(by.items(), 1):
        ax = fig.add_subplot(1, len(by), i)
        values = list(part["values"].items())
        acc = [r["accuracy"] for _, r in values]
        low = [r["accuracy"] - r["accuracy_ci"][0] for _, r in values]
        high = [r["accuracy_ci"][1] - r["accuracy"] for _, r in values]
        ax.bar(range(len(values)), acc, yerr=[low, high], capsize=3, color=f"C{i - 1}")
        ax.set_xticks(range(len(values)), [f"{v} ({r['n']})" for v, r in values], rotation=45, ha="right",
                      fontsize="x-small")
        ax.set(ylim=(0, 1), title=f"by {name}")
        if i == 1:
            ax.set_ylabel("accuracy (95% interval)")
    return _save(fig, file)


def plot_groups(names: list[str], series: dict[str, list[float | None]], file: Path) -> Path:
    """Accuracy within each group, one bar per series (validation, test) side by side."""
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = np.arange(len(names)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, [np.nan if v is None else v for v in values], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
    ax.set(ylabel="accuracy within the group", ylim=(0, 1), title="Per-group accuracy of the best model")
    ax.legend()
    return _save(fig, file)


def plot_pareto(exp: Experiment, objectives: list[str], front: list[dict[str, Any]], file: Path) -> Path:
    """The first objective against the second for every scored trial, the front as a line."""
    from . import objective_values

    fig = _figure(6, 4)
    ax = fig.add_subplot()
    points = [(e, objective_values(exp, e, objectives)) for e in exp.trials.values()
              if e["status"] not in FAILED]
    points = [(e, v) for e, v in points if v is not None]
    ax.scatter([v[1] for _, v in points], [v[0] for _, v in points], s=18, color="0.6", label="trials")
    ours = sorted((objective_values(exp, e, objectives) for e in front), key=lambda v: v[1])
    ax.plot([v[1] for v in ours], [v[0] for v in ours], "o-", color="C0", label="Pareto front")
    ax.set_xlabel(objectives[1])
    ax.set_ylabel(objectives[0])
    ax.legend(loc="best")
    fig.savefig(file)
    return file
