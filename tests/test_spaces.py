"""Search spaces: every shipped file loads, validates and samples through Optuna, without Ray."""

from __future__ import annotations

import optuna
import pytest

from tune_age.config import TrainConfig
from tune_age.errors import SpaceError
from tune_age.models import build_model
from tune_age.search.spaces import builtin_names, load_space, parse_space, seed_baseline

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("name", builtin_names())
def test_every_shipped_space_samples_valid_buildable_configs(name):
    space = load_space(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.suggest(study.ask())
        cfg = TrainConfig.from_dict(values)
        size = 128 if cfg.image_size == "native" else cfg.image_size
        if cfg.arch == "cnn":  # torchvision backbones are built in test_model
            build_model(cfg, 10, size)
    space.check_buildable(native_size=128)


def test_shipped_spaces_include_the_required_ones():
    assert {"quick", "default", "wide", "seed_baseline"} <= set(builtin_names())


def test_tpe_samples_conditional_parameters_only_when_active():
    space = load_space("default")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    seen_sgd = seen_other = False
    for _ in range(40):
        trial = study.ask()
        values = space.suggest(trial)
        assert ("momentum" in values) == (values["optimizer"] == "sgd")
        seen_sgd |= values["optimizer"] == "sgd"
        seen_other |= values["optimizer"] != "sgd"
        study.tell(trial, values["lr"])
    assert seen_sgd and seen_other


def test_seed_baseline_is_the_original_project():
    cfg = seed_baseline()
    assert (cfg.conv_layers, cfg.fc_layers, cfg.optimizer, cfg.lr, cfg.batch_size) == (3, 3, "adam", 0.001, 35)
    assert cfg.image_size == "native" and not cfg.batch_norm and cfg.head == "flatten"


def test_int_bounds_are_inclusive():
    space = parse_space({"params": {"conv_layers": {"int": [2, 3]}}}, "t.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert {space.suggest(study.ask())["conv_layers"] for _ in range(30)} == {2, 3}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"weight_decy": 0.1}, r"t\.yaml: params: unknown key 'weight_decy' \(did you mean 'weight_decay'\?\); valid keys: arch"),
        ({"lr": "fast"}, r"params\.lr: lr='fast' has the wrong type; expected float"),
        ({"conv_layers": {"int": [2, 9]}}, r"params\.conv_layers: conv_layers=9 is out of range; valid: 1 to 6"),
        ({"lr": {"loguniform": [0.1, 0.01]}}, r"params\.lr: low bound 0\.1 is above high bound 0\.01"),
        ({"lr": {"loguniform": [0, 0.01]}}, r"loguniform bounds must be above 0"),
        ({"optimizer": {"choice": []}}, r"params\.optimizer: choice needs a non-empty list"),
        ({"optimizer": {"choice": ["adam", "rmsprop"]}}, r"optimizer='rmsprop' is not valid; choose one of adam"),
        ({"lr": {"normal": [0, 1]}}, r"params\.lr: unknown distribution 'normal'"),
        ({"lr": {"uniform": [0.1]}}, r"uniform needs \[low, high\]"),
        ({"conv_layers": {"int": [2.5, 4]}}, r"int bounds must be whole numbers"),
        ({"momentum": {"uniform": [0.8, 0.9], "when": {"optimizer": "sgd"}}}, r"when refers to 'optimizer'"),
        ({"epochs": 5}, r"params\.epochs: not a search parameter; set max_epochs"),
    ],
)
def test_bad_spaces_name_file_key_and_what_is_valid(params, message):
    with pytest.raises(SpaceError, match=message):
        parse_space({"params": params}, "t.yaml")


def test_bad_sections_and_yaml(tmp_path):
    with pytest.raises(SpaceError, match="unknown section 'parms'"):
        parse_space({"parms": {}}, "t.yaml")
    with pytest.raises(SpaceError, match=r"search\.num_samples must be a whole number >= 1"):
        parse_space({"search": {"num_samples": 0}}, "t.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: [1, 2\n")
    with pytest.raises(SpaceError, match=r"bad\.yaml: invalid YAML at line"):
        load_space(bad)
    with pytest.raises(SpaceError, match=r"no search space named 'nope'; built-in spaces: default, quick"):
        load_space("nope")


def test_unbuildable_configuration_is_found_before_search():
    space = parse_space({"params": {"image_size": {"choice": [16, 64]}, "conv_layers": {"int": [2, 5]}}}, "t.yaml")
    with pytest.raises(SpaceError, match=r"image_size=16 is too small for conv_layers=5.*>= 32"):
        space.check_buildable(native_size=None)
    native = parse_space({"params": {"image_size": "native", "conv_layers": 6}}, "n.yaml")
    native.check_buildable(native_size=64)
    with pytest.raises(SpaceError, match="image_size=32 is too small"):
        native.check_buildable(native_size=32)


def test_fixed_values_for_train_and_refusal_of_distributions():
    assert load_space("seed_baseline").fixed()["lr"] == 0.001
    with pytest.raises(SpaceError, match="quick.yaml: .* is a distribution; a training config needs fixed values"):
        load_space("quick").fixed()
