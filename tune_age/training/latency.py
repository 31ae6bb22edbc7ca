"""A model's inference time on its own device, for searches of accuracy against latency.

    latency(model, image_size=64, device=torch.device("cpu"), norm=norm)
    # -> {"latency_ms": 2.1, "latency64_ms": 31.0, "params": 94321}

What a user's predict call pays for one face (batch 1) and for a batch of 64: normalization
and the forward pass in eval mode without gradients, on uint8 images already in memory
(decoding and resizing are the same for every model, so they are left out). Each batch size
runs WARMUP times first (allocator, oneDNN's kernel choice, cuDNN's autotuning), then the
median of RUNS timed calls; CUDA is synchronized around each call. The figure is as fair as
the machine is quiet: trials that run at once share its cores and memory bandwidth.
"""

from __future__ import annotations

import statistics
import time

import torch

WARMUP = 3
RUNS = {1: 15, 64: 5}


def _timed(model: torch.nn.Module, x: torch.Tensor, norm, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    model(norm(x) if norm is not None else x.float())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) * 1000.0


@torch.no_grad()
def latency(model: torch.nn.Module, image_size: int, device: torch.device, norm=None) -> dict[str, float]:
    """Median milliseconds per call at batch 1 and 64, and the model's parameter count."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for batch, runs in RUNS.items():
        x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(WARMUP):
            _timed(model, x, norm, device)
        out["latency_ms" if batch == 1 else f"latency{batch}_ms"] = round(
            statistics.median(_timed(model, x, norm, device) for _ in range(runs)), 4)
    model.train(was_training)
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    return out
