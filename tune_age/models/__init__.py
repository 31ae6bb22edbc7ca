"""The networks, built from a TrainConfig by the backbone registry (backbones.py).

    model = build_model(cfg, num_classes=10, image_size=64)                 # from scratch
    model = build_model(cfg, 10, 64, weights=pretrained_state("resnet18"))  # pretrained body

`arch=cnn` is AgeCNN (cnn.py); the torchvision backbones and `face_resnet` (dlib's age
network) have pretrained weights that weights.py finds on disk. `apply_freeze` sets which
stages train in a given epoch: `freeze` (none, head_only or a number of stages) and the
frozen-backbone warm-up (`warmup_epochs`).
"""

from __future__ import annotations

import logging

from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError
from .backbones import BACKBONES, Staged
from .cnn import AgeCNN, block_widths

__all__ = ["AgeCNN", "BACKBONES", "apply_freeze", "block_widths", "build_model", "count_parameters",
           "frozen_stages", "min_image_size"]

log = logging.getLogger(__name__)


def min_image_size(cfg: TrainConfig) -> int:
    """The smallest image side the network takes: every pooling step of a CNN must survive."""
    return 2**cfg.conv_layers if cfg.arch == "cnn" else BACKBONES[cfg.arch].min_size


def build_model(cfg: TrainConfig, num_classes: int, image_size: int, weights: dict | None = None,
                groups=None) -> Staged:
    """The network for `cfg`, its body loaded from `weights` (a state dict) when given; `groups`
    (AgeGroups) where the head maps ages to groups (age_head). Raises ConfigError when the image
    is too small for it."""
    if image_size < min_image_size(cfg):
        raise ConfigError(
            f"image_size={image_size} is too small for arch={cfg.arch}"
            + (f" with conv_layers={cfg.conv_layers}: each conv block halves the image, so use "
               if cfg.arch == "cnn" else "; use ")
            + f"image_size >= {min_image_size(cfg)}"
        )
    model = BACKBONES[cfg.arch].build(cfg, num_classes, image_size, weights, groups)
    apply_freeze(model, cfg, epoch=0)
    return model


def frozen_stages(model: Staged, cfg: TrainConfig, epoch: int) -> int:
    """How many stages of the body stay frozen in `epoch` (0-based): all of them during the
    warm-up and with freeze=head_only, else the number `freeze` gives (none: 0)."""
    total = len(model.features)
    if cfg.freeze == "head_only" or epoch < cfg.warmup_epochs:
        return total
    return 0 if cfg.freeze == "none" else min(int(cfg.freeze), total)


def apply_freeze(model: Staged, cfg: TrainConfig, epoch: int) -> None:
    model.freeze(frozen_stages(model, cfg, epoch))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
