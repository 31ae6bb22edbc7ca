"""Search spaces as data: YAML files with a small, closed vocabulary.

A space file has an optional `description`, an optional `search` section of
defaults for the search (num_samples, max_epochs, grace_period,
reduction_factor) and a `params` mapping from TrainConfig fields to either a
fixed value or exactly one distribution:

    params:
      lr: {loguniform: [1.0e-4, 3.0e-2]}
      dropout: {uniform: [0.0, 0.5]}
      conv_layers: {int: [2, 4]}          # inclusive
      optimizer: {choice: [adam, sgd]}
      momentum: {uniform: [0.8, 0.99], when: {optimizer: sgd}}
      batch_norm: true                    # fixed

`when` makes a parameter conditional on parameters listed above it. Every key
and every value a space can produce is checked against TrainConfig when the
file loads, so a bad space fails before Ray starts. `suggest(trial)` samples a
configuration define-by-run from an Optuna trial.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig, load_yaml, unknown_key_message
from ..errors import ConfigError, SpaceError
from ..models import min_image_size

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SEARCH_KEYS = {"num_samples": int, "max_epochs": int, "grace_period": int, "reduction_factor": int}
TOP_KEYS = ("description", "search", "params")
NOT_SEARCHABLE = {"epochs": "set max_epochs in the search section or --max-epochs instead"}


@dataclass
class Param:
    name: str
    kind: str  # one of DISTRIBUTIONS, or "fixed"
    args: Any  # [lo, hi], the list of choices, or the fixed value
    when: dict[str, list] = field(default_factory=dict)

    def values_to_check(self) -> list:
        """The values that bound what this parameter can produce."""
        return [self.args] if self.kind == "fixed" else list(self.args)

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(key) in values for key, values in self.when.items())

    def sample(self, trial: Any) -> Any:
        """Draws this parameter from an optuna.Trial (or anything with its suggest_* API)."""
        if self.kind == "fixed":
            return self.args
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, *self.args, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.name, *self.args)
        if self.kind == "int":
            return trial.suggest_int(self.name, *self.args)
        return trial.suggest_categorical(self.name, list(self.args))


@dataclass
class Space:
    name: str
    source: str
    params: dict[str, Param]
    settings: dict[str, int]
    description: str = ""

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Define-by-run: samples the active parameters in file order."""
        chosen: dict[str, Any] = {}
        for p in self.params.values():
            if p.active(chosen):
                chosen[p.name] = p.sample(trial)
        return chosen

    @property
    def searched(self) -> list[str]:
        return [p.name for p in self.params.values() if p.kind != "fixed"]

    def fixed(self) -> dict[str, Any]:
        """The values of a space whose parameters are all fixed (for `tune-age train --config`)."""
        varying = self.searched
        if varying:
            raise SpaceError(
                f"{self.source}: {varying[0]} is a distribution; a training config needs fixed values"
            )
        return {p.name: p.args for p in self.params.values()}

    def image_sizes(self) -> list:
        """Every image_size a trial can ask for, so the driver decodes each once."""
        p = self.params.get("image_size")
        if p is None:
            return [TrainConfig().image_size]
        return p.values_to_check()

    def check_buildable(self, native_size: int | None) -> None:
        """Fails before the search if some configuration has an image too small for its model."""
        sizes = [native_size if s == "native" else s for s in self.image_sizes()]
        sizes = [s for s in sizes if s is not None]
        if not sizes:
            return
        smallest = min(sizes)
        archs = self.values("arch")
        worst = TrainConfig(arch="cnn", conv_layers=max(self.values("conv_layers")))
        for arch in archs:
            need = min_image_size(worst if arch == "cnn" else TrainConfig(arch=arch))
            if smallest < need:
                detail = f"conv_layers={worst.conv_layers}" if arch == "cnn" else f"arch={arch}"
                raise SpaceError(
                    f"{self.source}: image_size={smallest} is too small for {detail}, which the "
                    f"space can produce; each conv block halves the image, so raise image_size to "
                    f">= {need} or lower conv_layers"
                )

    def check_combinations(self, samples: int = 100, seed: int = 0) -> None:
        """Fails before the search when configurations drawn from the space break a rule that
        joins several keys (pretrained with arch=cnn, say); each value alone was checked on load."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        for _ in range(samples):
            values = self.suggest(study.ask())
            try:
                TrainConfig.from_dict(values)
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if self.params[k].kind != "fixed")
                raise SpaceError(f"{self.source}: the space can produce an invalid configuration "
                                 f"({shown or 'its fixed values'}): {exc}") from None

    def values(self, name: str) -> list:
        """Every value the space can give `name` (its bounds for a range; the default when absent)."""
        p = self.params.get(name)
        return p.values_to_check() if p else [getattr(TrainConfig(), name)]


def _check_param(source: str, name: str, raw: Any, seen: list[str]) -> Param:
    where = f"{source}: params.{name}"
    if name in NOT_SEARCHABLE:
        raise SpaceError(f"{where}: not a search parameter; {NOT_SEARCHABLE[name]}")
    if name not in TrainConfig.field_names():
        raise SpaceError(f"{source}: params: {unknown_key_message(name, TrainConfig.field_names())}")
    if not isinstance(raw, dict):
        param = Param(name, "fixed", raw)
    else:
        raw = dict(raw)
        when = raw.pop("when", {})
        kinds = [k for k in raw if k in DISTRIBUTIONS]
        unknown = [k for k in raw if k not in DISTRIBUTIONS]
        if unknown or len(kinds) != 1:
            what = f"unknown distribution {unknown[0]!r}" if unknown else "needs exactly one distribution"
            raise SpaceError(f"{where}: {what}; use one of {', '.join(DISTRIBUTIONS)} (plus optional when)")
        kind, args = kinds[0], raw[kinds[0]]
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise SpaceError(f"{where}: choice needs a non-empty list of values")
        else:
            if not isinstance(args, list) or len(args) != 2:
                raise SpaceError(f"{where}: {kind} needs [low, high]")
            lo, hi = args
            numeric = (int,) if kind == "int" else (int, float)
            if any(isinstance(v, bool) or not isinstance(v, numeric) for v in args):
                wanted = "whole numbers" if kind == "int" else "numbers"
                raise SpaceError(f"{where}: {kind} bounds must be {wanted}, got {args}")
            if lo > hi:
                raise SpaceError(f"{where}: low bound {lo} is above high bound {hi}")
            if kind == "loguniform" and lo <= 0:
                raise SpaceError(f"{where}: loguniform bounds must be above 0, got {lo}")
        if not isinstance(when, dict):
            raise SpaceError(f"{where}: when must map earlier parameter names to values")
        when = {k: (v if isinstance(v, list) else [v]) for k, v in when.items()}
        for key in when:
            if key not in seen:
                raise SpaceError(f"{where}: when refers to {key!r}, which must be a parameter listed above it")
        param = Param(name, kind, args, when)
    for value in param.values_to_check():
        try:
            TrainConfig.check_value(name, value)
        except ConfigError as exc:
            raise SpaceError(f"{where}: {exc}") from None
    return param


def parse_space(data: dict[str, Any], source: str, name: str = "") -> Space:
    """Validates a loaded YAML mapping; errors name the file and key."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpaceError(f"{source}: unknown section {unknown[0]!r}; valid: {', '.join(TOP_KEYS)}")
    settings = data.get("search") or {}
    if not isinstance(settings, dict):
        raise SpaceError(f"{source}: search must be a mapping of {', '.join(SEARCH_KEYS)}")
    for key, value in settings.items():
        if key not in SEARCH_KEYS:
            raise SpaceError(f"{source}: search: unknown key {key!r}; valid: {', '.join(SEARCH_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpaceError(f"{source}: search.{key} must be a whole number >= 1, got {value!r}")
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise SpaceError(f"{source}: params must be a mapping of TrainConfig fields to values")
    params: dict[str, Param] = {}
    for key, raw in raw_params.items():
        params[key] = _check_param(source, str(key), raw, list(params))
    return Space(name or Path(source).stem, source, params, dict(settings), str(data.get("description", "")))


def builtin_dir() -> Path:
    """The shipped search_spaces folder: the source tree's, else the installed package's.

    setup.cfg installs search_spaces/ as the package `tune_age.search_spaces`, so
    names work after a non-editable install; an editable install or a checkout
    reads the folder beside the package.
    """
    source_tree = Path(__file__).resolve().parents[2] / "search_spaces"
    if source_tree.is_dir():
        return source_tree
    return Path(str(importlib.resources.files("tune_age"))) / "search_spaces"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


def load_space(name_or_path: str | Path) -> Space:
    """A built-in space by name (`quick`) or a YAML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        path = builtin_dir() / f"{text}.yaml"
        if not path.is_file():
            raise SpaceError(
                f"no search space named {text!r}; built-in spaces: {', '.join(builtin_names())} "
                "(or give a path to a .yaml file)"
            )
    try:
        values = load_yaml(path)
    except ConfigError as exc:
        raise SpaceError(str(exc)) from None
    return parse_space(values, str(path), path.stem)


def seed_baseline() -> TrainConfig:
    """The original project's configuration, from search_spaces/seed_baseline.yaml."""
    space = load_space("seed_baseline")
    return TrainConfig.from_dict(space.fixed(), source=space.source)
