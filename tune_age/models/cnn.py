"""`AgeCNN`: the configurable from-scratch CNN (the original project's family).

1-6 conv blocks (conv, optional batch-norm, ReLU, 2x2 pooling) whose width starts at
`channels` and grows by `channel_growth` per block, then a global-average-pool or flatten
head and 1-4 linear layers (the last one is the classifier).
"""

from __future__ import annotations

from torch import nn

from ..config import TrainConfig
from .backbones import Staged


def block_widths(cfg: TrainConfig) -> list[int]:
    return [max(1, round(cfg.channels * cfg.channel_growth**i)) for i in range(cfg.conv_layers)]


class AgeCNN(Staged):
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
