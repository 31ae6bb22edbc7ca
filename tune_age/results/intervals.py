"""How sure a figure is: 95 % intervals for scores on a few hundred (or a dozen) images.

    wilson(0.44, 45)                          # (0.31, 0.59): accuracy 0.44 on 45 images
    bootstrap(pred, target, accuracy)         # percentile interval over images, resampled
    paired(pred_a, pred_b, target, accuracy)  # a - b on the same images, and its interval

The Wilson interval is the score interval of a proportion (accuracy, one-off accuracy),
right even at 0 or 1 and on tiny splits where the normal approximation is not. For other
metrics (macro-F1, MAE) and for differences between two models on the same images, the
bootstrap resamples images with replacement (2,000 times, seeded).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Z95 = 1.959964
RESAMPLES = 2000


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed on n items; (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(pred == target)) if len(target) else float("nan")


def one_off(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - target) <= 1)) if len(target) else float("nan")


def _resamples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def bootstrap(pred: np.ndarray, target: np.ndarray, metric: Callable = accuracy,
              seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile interval of metric(pred, target) over images resampled."""
    pred, target = np.asarray(pred), np.asarray(target)
    if len(target) == 0:
        return float("nan"), float("nan")
    values = [metric(pred[i], target[i]) for i in _resamples(len(target), seed)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def paired(pred_a: np.ndarray, pred_b: np.ndarray, target: np.ndarray, metric: Callable = accuracy,
           seed: int = 0) -> tuple[float, float, float]:
    """(metric of a - metric of b, and its 95 % interval) on the same images resampled together:
    an interval above 0 says a is better on images like these."""
    pred_a, pred_b, target = map(np.asarray, (pred_a, pred_b, target))
    diff = metric(pred_a, target) - metric(pred_b, target)
    values = [metric(pred_a[i], target[i]) - metric(pred_b[i], target[i])
              for i in _resamples(len(target), seed)]
    return float(diff), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def fmt_interval(value: float, low: float, high: float, digits: int = 3) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
