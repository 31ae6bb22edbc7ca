"""The backbone registry: every network tune_age trains, by its `arch` name.

    spec = BACKBONES["resnet18"]      # builder, input size and normalization of its weights,
    net = spec.build(cfg, 10, 64, state)  # feature width, where its weights come from

Every network has the same three parts, which is what freezing and frozen-feature trials
rely on: `features` (an nn.Sequential of stages, input side first), `pool` (to N x width)
and `classifier` (the head). `frozen` stages stay in eval mode and get no gradient.

| arch | features | width | pretrained weights |
| --- | --- | --- | --- |
| cnn | AgeCNN's conv blocks | its last block | none: always trained from scratch |
| resnet18, resnet34 | stem, layer1-4 | 512 | ImageNet, torchvision's weights API |
| mobilenet_v3_small / _large | torchvision's 13 / 17 blocks | 576 / 960 | ImageNet, torchvision |
| efficientnet_b0 | torchvision's 9 stages | 1280 | ImageNet, torchvision |
| face_resnet | stem and 5 residual blocks | 256 | dlib's age network (CC0), `tune_age[faces]` |

Pretrained weights are given to `build` as a state dict (weights.py finds them on disk, in
the driver); the builders never download anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import TrainConfig
from . import face_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Staged(nn.Module):
    """features -> pool -> classifier, with the first `frozen` stages of features frozen."""

    def __init__(self):
        super().__init__()
        self.frozen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features, N x width: what a head trained on frozen features sees."""
        return self.pool(self.features(x))

    def freeze(self, stages: int) -> None:
        """Freezes the first `stages` stages (all of them for len(self.features)): no
        gradient, and batch-norm statistics kept as they are (eval mode) while training."""
        self.frozen = max(0, min(stages, len(self.features)))
        for i, stage in enumerate(self.features):
            for p in stage.parameters():
                p.requires_grad_(i >= self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Staged":
        super().train(mode)
        for stage in list(self.features)[: self.frozen]:
            stage.eval()
        return self


class Pretrained(Staged):
    """A pretrained body as stages, global average pooling, and a dropout + linear head."""

    def __init__(self, stages: list[nn.Module], width: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[TrainConfig, int, int, dict | None, Any], nn.Module]
    width: int | None  # pooled features; None: depends on the config (cnn)
    input_size: int | None  # the side its pretrained weights were trained at
    mean: tuple[float, float, float] | None  # normalization of its pretrained weights, 0-1 units
    std: tuple[float, float, float] | None
    weights: str  # where pretrained weights come from, for people
    min_size: int = 32
    license: str = ""


def _body_of(model: nn.Module, name: str) -> tuple[list[nn.Module], int]:
    """A torchvision classifier's body as stages, and the width of its pooled features."""
    if name.startswith("resnet"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4], model.fc.in_features
    stages = list(model.features)
    width = [m for m in stages[-1].modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    return stages, width


def _torchvision(name: str) -> Callable:
    def build(cfg: TrainConfig, num_classes: int, image_size: int, state: dict | None, groups=None) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        if state is not None:
            model.load_state_dict(state)  # strict: the file is the network it claims to be
        stages, width = _body_of(model, name)
        return Pretrained(stages, width, num_classes, cfg.dropout)
    return build


def _face_resnet(cfg: TrainConfig, num_classes: int, image_size: int, state: dict | None,
                 groups=None) -> nn.Module:
    body = face_resnet.FaceResNet()
    if state is not None:
        body.load_state_dict(state)
    stem = nn.Sequential(body.stem, nn.ReLU(), nn.MaxPool2d(3, 2))
    net = Pretrained([stem, *body.blocks], face_resnet.FEATURES, num_classes, cfg.dropout)
    if cfg.age_head:
        if groups is None or len(groups) != num_classes:
            raise ValueError("age_head=true needs the age groups to build its head")
        head = face_resnet.AgeGroupHead(face_resnet.AGES, [groups.index_of_age(a) for a in face_resnet.AGES],
                                        num_classes)
        head.ages.load_state_dict(body.age_head.state_dict())  # pretrained, or random like the body
        net.classifier = nn.Sequential(nn.Dropout(cfg.dropout), head)
    return net


def _cnn(cfg: TrainConfig, num_classes: int, image_size: int, state: dict | None, groups=None) -> nn.Module:
    from .cnn import AgeCNN

    return AgeCNN(cfg, num_classes, image_size)


_TV = "ImageNet weights through torchvision's weights API ($TORCH_HOME or --weights-dir)"
FACE_MEAN = tuple(m / 255.0 for m in face_resnet.MEANS)
FACE_STD = (face_resnet.SCALE / 255.0,) * 3

BACKBONES: dict[str, Backbone] = {
    "cnn": Backbone("cnn", _cnn, None, None, None, None, "none (trained from scratch)", min_size=2),
    **{name: Backbone(name, _torchvision(name), width, 224, IMAGENET_MEAN, IMAGENET_STD, _TV)
       for name, width in (("resnet18", 512), ("resnet34", 512), ("mobilenet_v3_small", 576),
                           ("mobilenet_v3_large", 960), ("efficientnet_b0", 1280))},
    "face_resnet": Backbone("face_resnet", _face_resnet, face_resnet.FEATURES, face_resnet.INPUT_SIZE,
                            FACE_MEAN, FACE_STD, "dlib's age network from " + face_resnet.INSTALL,
                            min_size=32, license=face_resnet.LICENSE),
}


def backbone(name: str) -> Backbone:
    return BACKBONES[name]


def stages(model: nn.Module) -> int:
    return len(model.features)


def describe() -> list[dict[str, Any]]:
    """The registry as rows, for `--help`-style listings and the README."""
    return [{"arch": b.name, "width": b.width, "input_size": b.input_size, "weights": b.weights}
            for b in BACKBONES.values()]
