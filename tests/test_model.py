"""Model and engine: shapes, gradients and finiteness across configurations; learning; augmentation."""

from __future__ import annotations

import pytest
import torch

from tune_age.training import engine
from tune_age.config import TrainConfig
from tune_age.errors import ConfigError
from tune_age.models import build_model, min_image_size
from tune_age.search.spaces import seed_baseline

CONFIGS = {
    "default": TrainConfig(),
    "seed_baseline": seed_baseline(),
    "one_block_flatten": TrainConfig(conv_layers=1, head="flatten", fc_layers=1),
    "six_blocks_avgpool": TrainConfig(conv_layers=6, pool="avg", channels=8, fc_layers=4, dropout=0.5),
    "wide_kernel_no_bn": TrainConfig(kernel_size=7, batch_norm=False, channel_growth=1.5),
    "resnet18": TrainConfig(arch="resnet18"),
    "mobilenet_v3_small": TrainConfig(arch="mobilenet_v3_small"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shape_gradients_and_no_nans(name):
    cfg = CONFIGS[name]
    size = 64
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=7, image_size=size)
    x = torch.randn(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname


def test_any_large_enough_size_works_and_too_small_is_a_clear_error():
    cfg = TrainConfig(conv_layers=4, head="flatten")
    for size in (16, 40, 97):
        assert build_model(cfg, 3, size)(torch.zeros(2, 3, size, size)).shape == (2, 3)
    assert min_image_size(cfg) == 16
    with pytest.raises(ConfigError, match=r"image_size=8 is too small for arch=cnn with conv_layers=4.*>= 16"):
        build_model(cfg, 3, 8)


def test_engine_overfits_a_tiny_batch():
    torch.manual_seed(0)
    cfg = TrainConfig(lr=0.003, dropout=0.0, flip=False, weight_decay=0.0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(24) % 4
    model = build_model(cfg, 4, 32)
    norm = engine.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    opt = engine.build_optimizer(cfg, model)
    loss_fn = engine.build_loss(cfg, torch.bincount(labels, minlength=4))
    first = engine.train_one_epoch(model, images, labels, opt, loss_fn, batch_size=8, norm=norm)
    for _ in range(40):
        last = engine.train_one_epoch(model, images, labels, opt, loss_fn, batch_size=8, norm=norm)
    assert last["loss"] < first["loss"] / 5
    metrics = engine.evaluate(model, images, labels, norm=norm, num_classes=4)
    assert metrics["accuracy"] == 1.0 and metrics["one_off"] == 1.0 and metrics["macro_f1"] == 1.0


def test_metrics_on_a_known_confusion():
    pred = torch.tensor([0, 1, 2, 2, 0, 3])
    true = torch.tensor([0, 1, 1, 2, 3, 3])
    ages = torch.tensor([5.0, 15.0, 12.0, float("nan"), 35.0, 38.0])
    m = engine.classification_metrics(pred, true, 4, ages, centers=[5.0, 15.0, 25.0, 35.0])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["one_off"] == pytest.approx(5 / 6)  # 0 vs 3 is the only miss by more than one group
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert m["confusion"][1] == [0, 1, 1, 0] and m["confusion"][3] == [1, 0, 0, 1]
    # known ages: |5-5|, |15-15|, |25-12|, |5-35|, |35-38| -> mean 46/5
    assert m["mae"] == pytest.approx(46 / 5)
    assert engine.classification_metrics(pred, true, 4)["mae"] is None


def test_divergence_is_detected():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    norm = engine.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(engine.Diverged, match="try a lower lr"):
        engine.train_one_epoch(model, images, torch.zeros(6, dtype=torch.long), opt,
                               torch.nn.CrossEntropyLoss(), batch_size=3, norm=norm)


def test_augmentation_keeps_shape_and_range_and_varies_per_image():
    x = torch.rand(16, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    out = engine.Augment(flip=True, crop_scale=0.5, color_jitter=0.4)(x, gen)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    same = engine.Augment(flip=True, crop_scale=0.5, color_jitter=0.4)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)  # seeded
    flipped = engine.Augment(flip=True)(x, torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(2)) for i in range(16))
    assert 0 < n_flipped < 16  # a coin per image, not per batch
