"""Typed configuration: what one training run needs and what one search needs.

`TrainConfig` describes one model and its training (everything a search can
vary); `DataConfig` says which images to use and how to label and split them;
`SearchConfig` says how to run a search. Each validates itself on creation, and
unknown keys fail with the key's name and the valid ones:

    cfg = TrainConfig.from_dict({"lr": 0.01, "conv_layers": 4})
    cfg = apply_overrides(cfg, ["batch_size=64", "optimizer=sgd"])
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

ARCHS = ("cnn", "resnet18", "resnet34", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
         "face_resnet")  # models/backbones.py builds each
FREEZE = ("none", "head_only")  # or a number of stages
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step")
POOLS = ("max", "avg")
HEADS = ("gap", "flatten")
DEVICES = ("auto", "cpu", "cuda", "mps")
FORMATS = ("auto", "utkface", "folders", "csv")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("tpe", "random")
METRICS = {  # name -> mode
    "val_acc": "max",
    "val_one_off": "max",
    "val_f1": "max",
    "val_balanced_acc": "max",
    "val_loss": "min",
    "val_mae": "min",
}


_VALUE_ALONE = contextvars.ContextVar("value_alone", default=False)  # set by check_value


class _Config:
    """Shared behaviour: type checks, closed choices and ranges, dict round trip."""

    _choices: dict[str, tuple] = {}
    _ranges: dict[str, tuple] = {}  # name -> (low, high), inclusive; None = open

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(type(self).__name__, f.name, value, hints[f.name]))
        for name, valid in self._choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ConfigError(
                    f"{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}"
                )
        for name, (low, high) in self._ranges.items():
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                lo = "-inf" if low is None else low
                hi = "inf" if high is None else high
                raise ConfigError(f"{name}={value!r} is out of range; valid: {lo} to {hi}")
        self._check()
        if not _VALUE_ALONE.get():
            self._check_combination()

    def _check(self) -> None:
        """Checks of single values beyond type, choices and range; subclasses override."""

    def _check_combination(self) -> None:
        """Checks that involve several fields; subclasses override."""

    @classmethod
    def check_value(cls, name: str, value: Any) -> None:
        """Validates one field's value on its own (a search space's bound or choice): type,
        choices, range and single-value rules, but not how it combines with other fields."""
        token = _VALUE_ALONE.set(True)
        try:
            cls.from_dict({name: value})
        finally:
            _VALUE_ALONE.reset(token)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "") -> Any:
        where = f"{source}: " if source else ""
        unknown = [k for k in values if k not in cls.field_names()]
        if unknown:
            raise ConfigError(f"{where}{unknown_key_message(unknown[0], cls.field_names())}")
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Any:
        return self.from_dict({**self.to_dict(), **changes})


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}"


def _coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the annotation, allowing int where float is expected."""
    options = get_args(hint) if get_origin(hint) is Union else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{name}={value!r} has the wrong type; expected {wanted}")


@dataclass
class TrainConfig(_Config):
    """One model and how it is trained; every field can be searched."""

    # model
    arch: str = "cnn"
    conv_layers: int = 3
    channels: int = 32  # output channels of the first conv block
    channel_growth: float = 2.0  # width multiplier from one block to the next
    kernel_size: int = 3
    batch_norm: bool = True
    pool: str = "max"
    head: str = "gap"  # gap: global average pool; flatten: the original's dense head
    fc_layers: int = 2
    fc_width: int = 128
    dropout: float = 0.2
    pretrained: bool = False  # start from the backbone's pretrained weights (not for cnn)
    freeze: Union[int, str] = "none"  # none, head_only (the whole body), or that many stages
    backbone_lr_scale: float = 1.0  # the body's learning rate is lr times this
    warmup_epochs: int = 0  # epochs that train the head alone before `freeze` applies
    age_head: bool = False  # face_resnet: groups through its 81-way age head, pretrained when it is
    # optimization
    optimizer: str = "adamw"
    lr: float = 0.003
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0005
    schedule: str = "cosine"
    step_size: int = 10  # epochs between lr drops with schedule=step
    gamma: float = 0.1
    label_smoothing: float = 0.0
    class_weighting: bool = False
    batch_size: int = 64
    epochs: int = 10
    # input and augmentation
    image_size: Union[int, str] = 64  # pixels per side, or "native"
    flip: bool = True
    crop_scale: float = 1.0  # smallest area kept by random resized crop; 1.0 = off
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    # run
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision where the device is CUDA

    _choices = {
        "arch": ARCHS,
        "pool": POOLS,
        "head": HEADS,
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "device": DEVICES,
    }
    _ranges = {
        "conv_layers": (1, 6),
        "channels": (1, 1024),
        "channel_growth": (1.0, 4.0),
        "kernel_size": (1, 11),
        "fc_layers": (1, 4),
        "fc_width": (1, 8192),
        "dropout": (0.0, 0.95),
        "lr": (1e-7, 10.0),
        "momentum": (0.0, 0.999),
        "weight_decay": (0.0, 1.0),
        "step_size": (1, None),
        "gamma": (0.0, 1.0),
        "label_smoothing": (0.0, 0.5),
        "backbone_lr_scale": (1e-4, 1.0),
        "warmup_epochs": (0, 1000),
        "batch_size": (1, 65536),
        "epochs": (1, 10000),
        "image_size": (8, 1024),
        "crop_scale": (0.05, 1.0),
        "color_jitter": (0.0, 1.0),
    }

    def _check(self) -> None:
        if isinstance(self.image_size, str) and self.image_size != "native":
            raise ConfigError(
                f"image_size={self.image_size!r} is not valid; use a pixel count (8 to 1024) or 'native'"
            )
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size={self.kernel_size} must be odd (1, 3, 5, ...)")
        if isinstance(self.freeze, bool) or (isinstance(self.freeze, str) and self.freeze not in FREEZE) \
                or (isinstance(self.freeze, int) and self.freeze < 0):
            raise ConfigError(f"freeze={self.freeze!r} is not valid; use none, head_only or a number "
                              "of stages (0 or more)")

    def _check_combination(self) -> None:
        transfer = {"pretrained": self.pretrained, "freeze": self.freeze not in ("none", 0),
                    "warmup_epochs": self.warmup_epochs > 0}
        if self.arch == "cnn" and any(transfer.values()):
            key = next(k for k, v in transfer.items() if v)
            raise ConfigError(f"{key}={getattr(self, key)!r} needs a pretrained backbone, and arch=cnn "
                              f"has none; choose arch from {', '.join(ARCHS[1:])} or leave {key} at its default")
        if self.age_head and self.arch != "face_resnet":
            raise ConfigError(f"age_head=true is the face network's own age head; it needs "
                              f"arch=face_resnet, not arch={self.arch}")
        if not self.pretrained and (transfer["freeze"] or transfer["warmup_epochs"]):
            key = "freeze" if transfer["freeze"] else "warmup_epochs"
            raise ConfigError(f"{key}={getattr(self, key)!r} freezes random weights; set pretrained=true "
                              f"or leave {key} at its default")


@dataclass
class DataConfig(_Config):
    """Which images, how they are labelled and how they are split."""

    path: Union[str, None] = None  # None: the built-in synthetic faces
    format: str = "auto"
    bins: str = "decades"  # a preset name or edges such as "0,13,20,40,60"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    synthetic_n: int = 3000  # images drawn when path is None
    synthetic_seed: int = 0
    square: str = "crop"  # crop: center crop; pad: pad the short side
    dedupe: str = "exact"  # exact: same file or bytes; near: also a perceptual hash; off
    detect_faces: bool = False  # find and align the face in each photo first (data/faces.py), cached
    cache_dir: Union[str, None] = None  # default: ~/.cache/tune_age

    _choices = {"format": FORMATS, "square": ("crop", "pad"), "dedupe": ("exact", "near", "off")}
    _ranges = {
        "val_fraction": (0.01, 0.9),
        "test_fraction": (0.0, 0.9),
        "synthetic_n": (10, 1_000_000),
    }

    def _check(self) -> None:
        if self.val_fraction + self.test_fraction >= 0.95:
            raise ConfigError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves too little to train on; keep the sum below 0.95"
            )


MEASURES = ("latency_ms", "latency64_ms", "params")  # training/latency.py; all better smaller


@dataclass
class SearchConfig(_Config):
    """How one search runs: its space, budget, resources and storage."""

    space: str = "quick"  # a name in search_spaces/ or a YAML path
    num_samples: Union[int, None] = None  # None: the space's own default
    metric: str = "val_acc"
    max_epochs: Union[int, None] = None  # None: the space's own default
    cpus_per_trial: Union[float, None] = None  # None: chosen from the machine
    gpus_per_trial: Union[float, None] = None
    max_concurrent: Union[int, None] = None
    address: Union[str, None] = None  # None: a local Ray instance
    storage: Union[str, None] = None  # default: ~/tune_age_results
    time_budget_min: Union[float, None] = None
    name: Union[str, None] = None
    resume: bool = False
    seed: int = 0
    scheduler: str = "asha"
    searcher: str = "tpe"
    baseline_first: bool = True
    max_failures: int = 2
    weights_dir: Union[str, None] = None  # pretrained weights; default $TUNE_AGE_WEIGHTS, torch's cache
    cv: Union[int, None] = None  # folds of train+val per trial; None: 5 when val < 200 images, else 1
    warm_start: Union[str, None] = None  # an earlier search's folder: its fitting trials seed the study
    objectives: Union[str, None] = None  # "val_acc,latency_ms": a multi-objective study, the metric first
    mlflow: Union[str, None] = None  # an MLflow tracking URI: each trial logged there as a run
    study_storage: Union[str, None] = None  # a database URL for the Optuna study; None: study.db in the folder
    memory_map: str = "auto"  # trials map the decode cache (on) or read Ray's object store (off); auto: by size

    _choices = {"metric": tuple(METRICS), "scheduler": SCHEDULERS, "searcher": SEARCHERS,
                "memory_map": ("auto", "on", "off")}
    _ranges = {
        "num_samples": (1, None),
        "max_epochs": (1, None),
        "cpus_per_trial": (0.01, None),
        "gpus_per_trial": (0.0, None),
        "max_concurrent": (1, None),
        "time_budget_min": (0.01, None),
        "max_failures": (0, 100),
        "cv": (1, 20),
    }

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    @property
    def objective_list(self) -> list[str]:
        """The study's objectives: the metric, then what --objectives adds (measures)."""
        return [x.strip() for x in self.objectives.split(",")] if self.objectives else [self.metric]

    def _check(self) -> None:
        if not self.objectives:
            return
        names = self.objective_list
        valid = ", ".join(MEASURES)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"objectives={self.objectives!r}: give the metric and at least one other "
                              f"objective, each once, such as val_acc,latency_ms ({valid})")
        if names[0] != self.metric:
            raise ConfigError(f"objectives={self.objectives!r}: the first objective is the metric "
                              f"({self.metric}), which ASHA prunes on; put it first")
        for name in names[1:]:
            if name not in MEASURES:
                raise ConfigError(f"objectives={self.objectives!r}: {name!r} is not a measure a trial "
                                  f"takes; valid: {valid}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping with safe_load; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turns ["lr=0.01", "flip=false"] into typed values (YAML scalars)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not key=value (for example lr=0.01)")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """A copy of `cfg` with key=value overrides applied and validated."""
    return cfg.from_dict({**cfg.to_dict(), **parse_overrides(pairs)}, source="override")
