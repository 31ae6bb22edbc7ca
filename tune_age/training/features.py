"""Frozen-feature trials: a frozen backbone's features, computed once per (backbone, weights,
image size, normalization, data) and cached on disk, so that a head trains in seconds.

A configuration qualifies when its whole body is frozen for every epoch (pretrained,
freeze=head_only) and nothing changes its input between epochs (no flip, crop or colour
jitter): then every epoch would compute the same features again.

    if uses_frozen_features(cfg):
        feats, source = frozen_features(model, images, norm, key)   # N x width float32

The cache lives under `<cache root>/features/<key>.npy` (cache root: $TUNE_AGE_CACHE or
~/.cache/tune_age), written atomically; trials that start together take a file lock, so
one computes and the others read. A second search on the same data computes nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..data.decode import cache_root
from .engine import Normalizer, gather_batches

log = logging.getLogger(__name__)

FEATURES_VERSION = 1  # bump when what `embed` returns for the same weights changes
BATCH = 128


def uses_frozen_features(cfg: TrainConfig) -> bool:
    """True when every epoch would see the same features of a frozen body."""
    return (cfg.pretrained and cfg.freeze == "head_only" and not cfg.flip
            and cfg.crop_scale >= 1.0 and cfg.color_jitter <= 0)


def feature_key(arch: str, weights_id: str, image_size: int, mean: list[float], std: list[float],
                fingerprint: str) -> str:
    blob = json.dumps([FEATURES_VERSION, arch, weights_id, image_size, [round(v, 8) for v in mean],
                       [round(v, 8) for v in std], fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def compute_features(model: torch.nn.Module, images: torch.Tensor, norm: Normalizer) -> np.ndarray:
    """model.embed of every image (uint8 N x 3 x S x S), in eval mode, as float32 N x width."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = gather_batches(images, BATCH, lambda batch: model.embed(norm(batch.to(device, non_blocking=True))),
                             torch.device("cpu"))
    finally:
        model.train(was_training)
    return np.zeros((0, 0), np.float32) if out is None else out.numpy()


def frozen_features(model: torch.nn.Module, images: torch.Tensor, norm: Normalizer, key: str,
                    cache_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """(features of every image, "cached" or "computed"), through the on-disk cache."""
    folder = Path(cache_dir) if cache_dir else cache_root() / "features"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{key}.npy"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trial computes; the others wait and read
        if file.is_file():
            try:
                feats = np.load(file, allow_pickle=False)
                if len(feats) == len(images):
                    return feats, "cached"
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable feature cache %s: %s", file, exc)
        feats = compute_features(model, images, norm)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".npy")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, feats)
        os.replace(tmp, file)
        log.info("computed %d x %d frozen features into %s", *feats.shape, file)
        return feats, "computed"
