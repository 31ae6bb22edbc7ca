"""The throughput benchmark's yardsticks: FLOPs counted as autograd runs them, and a limit
that is the best of several GEMM shapes (benchmarks/throughput.py prints both)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput  # noqa: E402

from tune_age.config import TrainConfig  # noqa: E402
from tune_age.models import build_model  # noqa: E402


def test_training_flops_are_counted_not_tripled():
    model = build_model(TrainConfig(), 10, 64)
    forward = throughput.forward_flops(model, 64)
    train = throughput.training_flops(model, 64, 10)
    # The first conv computes no gradient for its input, so a step is less than 3x forward.
    assert 2 * forward < train < 3 * forward


def test_the_gemm_limit_is_the_best_shape_and_the_theoretical_peak_is_explained():
    torch.set_num_threads(1)
    shapes = ((256, 256, 256), (512, 512, 512), (4096, 27, 32))
    best, shape = throughput.gemm_limit(shapes, reps=2)
    assert shape in shapes and best > 0
    peak, how = throughput.fma_peak(1)
    assert (peak is None and how) or (peak > 0 and "GHz" in how and "lanes" in how)
