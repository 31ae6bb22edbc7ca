"""The networks: `AgeCNN`, built from a TrainConfig, and optional torchvision backbones.

    model = build_model(cfg, num_classes=10, image_size=64)

`AgeCNN` stacks 1-6 conv blocks (conv, optional batch-norm, ReLU, 2x2 pooling)
whose width starts at `channels` and grows by `channel_growth` per block, then
a global-average-pool or flatten head and 1-4 linear layers (the last one is
the classifier). `arch=resnet18|mobilenet_v3_small` swaps in a torchvision
backbone, with pretrained weights through torchvision's weights API when asked.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def block_widths(cfg: TrainConfig) -> list[int]:
    return [max(1, round(cfg.channels * cfg.channel_growth**i)) for i in range(cfg.conv_layers)]


def min_image_size(cfg: TrainConfig) -> int:
    """The smallest image side that survives every pooling step (custom CNN only)."""
    return 2**cfg.conv_layers if cfg.arch == "cnn" else 32


class AgeCNN(nn.Module):
    def __init__(self, cfg: TrainConfig, num_classes: int, image_size: int):
        super().__init__()
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[cfg.pool]
        layers: list[nn.Module] = []
        in_ch = 3
        for width in block_widths(cfg):
            layers.append(nn.Conv2d(in_ch, width, cfg.kernel_size, padding=cfg.kernel_size // 2,
                                    bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), pool(2)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2**cfg.conv_layers
        if cfg.head == "gap":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            features = in_ch
        else:
            self.pool = nn.Flatten()
            features = in_ch * side * side
        head: list[nn.Module] = []
        for _ in range(cfg.fc_layers - 1):
            head += [nn.Linear(features, cfg.fc_width), nn.ReLU(inplace=True)]
            if cfg.dropout > 0:
                head.append(nn.Dropout(cfg.dropout))
            features = cfg.fc_width
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _torchvision(name: str, cfg: TrainConfig, num_classes: int) -> nn.Module:
    import torchvision

    weights = None
    if cfg.pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # a download that failed: no network, no cached file
        raise ConfigError(
            f"pretrained weights for {name} could not be loaded ({type(exc).__name__}: {exc}); "
            "put the weights file in $TORCH_HOME/hub/checkpoints or set pretrained=false"
        ) from None
    if name == "resnet18":
        model.fc = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(model.fc.in_features, num_classes))
    else:  # mobilenet_v3_small: replace the last linear layer, keep its dropout
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    return model


BUILDERS = {
    "cnn": lambda cfg, n, size: AgeCNN(cfg, n, size),
    "resnet18": lambda cfg, n, size: _torchvision("resnet18", cfg, n),
    "mobilenet_v3_small": lambda cfg, n, size: _torchvision("mobilenet_v3_small", cfg, n),
}


def build_model(cfg: TrainConfig, num_classes: int, image_size: int) -> nn.Module:
    """The network for `cfg`; raises ConfigError when the image is too small for it."""
    if image_size < min_image_size(cfg):
        raise ConfigError(
            f"image_size={image_size} is too small for arch={cfg.arch}"
            + (f" with conv_layers={cfg.conv_layers}" if cfg.arch == "cnn" else "")
            + f": each conv block halves the image, so use image_size >= {min_image_size(cfg)}"
        )
    return BUILDERS[cfg.arch](cfg, num_classes, image_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
