"""`pneumo sweep`'s options and its search space: plain data, checked before Ray starts.

A sweep file (`ray_jobs/sweeps/*.yaml`) is flat options plus two mappings:

    recipe: ray_jobs/recipes/cnn_dropout.yaml     # the training options every trial starts from
    base: {epochs: 12, label_set: three_class}    # ... then these (any `pneumo train` option)
    search:                                        # ... then one value per trial of each of these
      padding: {grid: [same, valid]}               # every value (the grid multiplies)
      dropout: [0.0, 0.3, 0.5]                     # a plain list is a grid too
      optimizer: {choice: [adam, rmsprop]}         # one at random per sample
      lr: {loguniform: [1.0e-4, 1.0e-2]}           # also uniform, randint ([low, high))
      recipe: {grid: [ray_jobs/recipes/vgg19.yaml, ray_jobs/recipes/xception.yaml]}  # whole recipes
    metric: val_auc                                # or val_loss; ranked on validation only
    num_samples: 1                                 # grid x num_samples trials (random spaces: samples)
    scheduler: fifo                                # or asha: stops trials behind at epochs 1, 2, 4, ...
    searcher: basic                                # or optuna (`pip install pneumo[optuna]`; no grids)
    max_concurrent_trials: 0                       # 0: as many as the cluster's CPUs (GPUs) hold at once

Every grid/choice combination (numeric ranges at both ends) is resolved into a `TrainConfig` here,
so an option that does not exist or a combination that is invalid fails at once with the valid
choices, before Ray starts. `overrides` ("epochs=1,image_size=48,filters=[8,16]", values read as
YAML) replace recipe and base values
(smoke tests, quick looks) but never a searched option.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pneumo.config import ConfigError, from_dict, load_yaml
from pneumo.train.config import TrainConfig

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = {"val_auc": "max", "val_loss": "min"}
SCHEDULERS = ("fifo", "asha")
SEARCHERS = ("basic", "optuna")
RECIPE = "recipe"
TRIALS_DIR = "trials"  # <out>/trials/<trial_id>/: each trial's run folder
# set by the sweep for every trial, never by a sweep file
TRIAL_OWNED = ("data", "out", "name", "storage_path", "tracking", "tracking_uri", "experiment", "register",
               "s3_endpoint")
MAX_CHECKED = 512  # combinations resolved up front
REPO = Path(__file__).resolve().parents[2]


@dataclass
class SweepConfig:
    """Run a Ray Tune sweep of `pneumo train` runs; rank the trials on validation."""

    data: str = field(metadata={"positional": True, "help": "labelled data: folder or s3:// prefix"})
    out: str = field(default="sweeps/sweep", metadata={"help": "sweep folder: trials, table, best bundle"})
    name: str = field(default="", metadata={"help": "sweep name (Tune experiment, MLflow experiment); default: out's name"})
    recipe: str = field(default="", metadata={"help": "training recipe YAML every trial starts from"})
    base: dict = field(default_factory=dict, metadata={"help": "(sweep file) options every trial sets"})
    search: dict = field(default_factory=dict, metadata={"help": "(sweep file) option: {grid|choice|uniform|"
                                                                 "loguniform|randint: values}"})
    overrides: str = field(default="", metadata={"help": "key=value,... over recipe and base (not searched keys)"})
    metric: str = field(default="val_auc", metadata={"choices": list(METRICS), "help": "ranked on this, on val"})
    num_samples: int = field(default=1, metadata={"help": "samples of the space (a grid is repeated)"})
    scheduler: str = field(default="fifo", metadata={"choices": list(SCHEDULERS), "help": "asha: stop trials early"})
    grace_period: int = field(default=1, metadata={"help": "asha: epochs every trial gets"})
    reduction_factor: int = field(default=2, metadata={"help": "asha: keep the best 1/N at each rung"})
    searcher: str = field(default="basic", metadata={"choices": list(SEARCHERS), "help": "optuna: TPE (extra)"})
    seed: int = field(default=0, metadata={"help": "searcher seed"})
    max_concurrent_trials: int = field(default=0, metadata={"help": "0: sized from the cluster"})
    max_trials: int = field(default=0, metadata={
        "help": "run only the first N combinations of the grid/choices (0: all; smoke tests, quick looks)"})
    tracking: bool = field(default=True, metadata={"help": "MLflow runs for the sweep and every trial"})
    tracking_uri: str = field(default="", metadata={"help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                            "else sqlite:///<cwd>/mlflow.db)"})
    register: str = field(default="", metadata={"help": "register the best trial's bundle as a version of this model"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint for s3:// data"})

    def validate(self) -> None:
        if not isinstance(self.search, dict) or not isinstance(self.base, dict):
            raise ConfigError("search and base are mappings in the sweep file (option: values)")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("num_samples >= 1, grace_period >= 1, reduction_factor >= 2")
        if self.max_concurrent_trials < 0 or self.max_trials < 0:
            raise ConfigError("max_concurrent_trials and max_trials must be >= 0 (0: sized from the cluster / all)")
        if self.register and not self.tracking:
            raise ConfigError("register needs tracking (the registry is MLflow's)")
        self.recipe = _path(self.recipe) if self.recipe else ""
        if not self.search:
            raise ConfigError("search: nothing to sweep (give at least one option with values)")
        for key, spec in self.search.items():
            domain(key, spec)  # the shape of every entry
        if self.searcher == "optuna" and any(kind_of(s)[0] == "grid" for s in self.search.values()):
            raise ConfigError("searcher optuna samples; it takes no grid: write {choice: [...]} instead")
        if self.searcher == "optuna" and self.max_trials:
            raise ConfigError("max_trials cuts a grid; with searcher optuna use num_samples")
        self.trial_options({})  # recipe + base + overrides alone
        for combo in itertools.islice(combinations(self.search), MAX_CHECKED):
            self.trial_options(combo)

    # ------------------------------------------------------------------ derived

    @property
    def sweep_name(self) -> str:
        return self.name or Path(self.out.rstrip("/")).name or "sweep"

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def override_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in (p.strip() for p in re.split(r",(?=\s*\w+\s*=)", self.overrides) if p.strip()):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"overrides: {item!r} is not key=value")
            out[key.strip()] = yaml.safe_load(value)
        searched = sorted(set(out) & set(self.search))
        if searched:
            raise ConfigError(f"overrides: {', '.join(searched)} are searched; change the sweep file instead")
        return out

    def trial_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """A trial's training options: the recipe (or the searched one), base, overrides, its values;
        checked by building the TrainConfig (a ConfigError names what is wrong)."""
        recipe = values.get(RECIPE) or self.recipe
        options: dict[str, Any] = dict(load_yaml(_path(recipe))) if recipe else {}
        options.update(self.base)
        options.update(self.override_values())
        options.update({k: v for k, v in values.items() if k != RECIPE})
        owned = sorted(set(options) & set(TRIAL_OWNED))
        if owned:
            raise ConfigError(f"{', '.join(owned)}: set by the sweep for each trial, not in a sweep file")
        from_dict(TrainConfig, {**options, "data": self.data, "tracking": False}, source=f"trial {values}")
        return options


def _path(text: str) -> str:
    """A recipe path: as given (relative to the working directory), else relative to the repository."""
    for candidate in (text, str(REPO / text)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"recipe {text!r}: no such file (relative paths: from the working directory or the repo)")


def kind_of(spec: Any) -> tuple[str, Any]:
    """(kind, values) of a search entry: a plain list is a grid."""
    if isinstance(spec, list):
        return "grid", spec
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, values),) = spec.items()
        if kind in KINDS:
            return kind, values
    raise ConfigError(f"a search entry is a list or one of {{{', '.join(KINDS)}: values}}, got {spec!r}")


def domain(key: str, spec: Any) -> tuple[str, list[Any]]:
    """The checked (kind, values) of `search[key]`."""
    known = {f.name for f in fields(TrainConfig)} | {RECIPE}
    if key not in known or key in TRIAL_OWNED:
        raise ConfigError(f"search: {key!r} is not a training option. Valid: "
                          f"{', '.join(sorted(known - set(TRIAL_OWNED)))}")
    kind, values = kind_of(spec)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search.{key}: {kind} needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, int | float) for v in values) or values[0] >= values[1]:
            raise ConfigError(f"search.{key}: {kind} takes [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"search.{key}: loguniform needs low > 0")
    if key == RECIPE:
        values = [_path(v) for v in values]
    return kind, values


def combinations(search: dict[str, Any]) -> list[dict[str, Any]]:
    """Every categorical combination, numeric ranges at both ends (what `validate` resolves)."""
    keys, choices = [], []
    for key, spec in search.items():
        kind, values = domain(key, spec)
        keys.append(key)
        choices.append(values if kind in ("grid", "choice") else
                       [values[0], values[1] - 1 if kind == "randint" else values[1]])
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


COMBO = "combination"  # with max_trials: the trial's values, one grid entry of whole combinations


def param_space(search: dict[str, Any], max_trials: int = 0) -> dict[str, Any]:
    """The search space as Ray Tune domains (with `max_trials`: a grid of the first N combinations)."""
    from ray import tune

    if max_trials:
        return {COMBO: tune.grid_search(combinations(search)[:max_trials])}

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    space = {}
    for key, spec in search.items():
        kind, values = domain(key, spec)
        space[key] = make[kind](values)
    return space
