"""Which epoch is best: the one rule that `train`, the trial log, Ray's checkpoint keeping,
the trials table, the report and the export all use.

An epoch ranks by its metric (higher is better for val_acc, lower for val_loss); equal
metrics rank by the lower val_loss; an exact tie of both goes to the later epoch. The rule is
one number, `selection_score`, so that Ray keeps the checkpoint it names (Ray keeps the best
`num_to_keep` checkpoints by one reported attribute, and on equal scores drops the earlier):

    score = selection_score(metrics, "val_acc")      # None for a diverged or unscored epoch
    best = best_row(history, "val_acc")              # the row with the highest score

The val_loss term is at most 1e-7, below the smallest step of any count-based metric
(accuracy on 10 million validation images), so it only ever separates equal metrics.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..config import METRICS

SCORE_KEY = "selection_score"  # reported with every epoch; Ray keeps checkpoints by it
_LOSS_WEIGHT = 1e-7


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def selection_score(metrics: dict[str, Any], metric: str) -> float | None:
    """Larger is better; None when the epoch has no finite `metric` or diverged."""
    value = _number(metrics.get(metric))
    if value is None or metrics.get("diverged"):
        return None
    sign = 1.0 if METRICS[metric] == "max" else -1.0
    loss = _number(metrics.get("val_loss"))
    penalty = _LOSS_WEIGHT * (loss / (1.0 + loss)) if loss is not None and loss >= 0 else _LOSS_WEIGHT
    return sign * value - penalty


def best_row(rows: Iterable[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best of `rows` (per-epoch metric dicts) by `selection_score`; the later on a tie."""
    best, best_score = None, None
    for row in rows:
        score = selection_score(row, metric)
        if score is not None and (best_score is None or score >= best_score):
            best, best_score = row, score
    return best
