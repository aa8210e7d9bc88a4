"""`pneumo train`'s options: one flat, typed config (defaults, then a recipe YAML, then flags).

Plain data and light imports only (no torch), so a bad option is refused at once and the lower
training modules (`engine`, `worker`, `export`) can all read the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.config import ConfigError
from pneumo.io.preprocess import EQUALIZE_MODES, InputSpec
from pneumo.io.storage import Location, is_s3
from pneumo.labels import LABEL_SETS
from pneumo.models.calibration import CALIBRATIONS
from pneumo.models.zoo import FINETUNE_MODES, TTA_MODES, get_spec, list_models
from pneumo.precision import TORCH_PRECISIONS_AUTO
from pneumo.ray_env import job_submission_id
from pneumo.report.thresholds import THRESHOLD_METHODS
from pneumo.train.augment import Augment

BALANCE = ("none", "weighted_loss", "oversample")
AUG_FAMILIES = ("together", "alternate")


JOB_PLACEHOLDER = "{job}"
OPTIMIZERS = ("adam", "adamw", "adamax", "rmsprop", "sgd")
MODEL_OPTIONS = ("filters", "dropout", "batch_norm", "padding", "stride")  # TrainConfig fields passed to the model
PADDINGS = ("same", "valid")
SCHEDULERS = ("none", "plateau", "cosine")


@dataclass
class TrainConfig:
    """Train a pneumonia classifier with Ray Train and export a model bundle."""

    data: str = field(metadata={"positional": True, "help": "labelled data: folder or s3:// prefix with train/<CLASS>/"})
    out: str = field(default="runs/train", metadata={"help": "run folder: bundle, config.yaml, report"})
    name: str = field(default="", metadata={"help": "run name (same name + storage_path resumes); default: out's "
                                            "folder name; {job} = this Ray job's submission id (a new run per job)"})
    storage_path: str = field(default="", metadata={"help": "Ray Train storage (folder or s3://); default: <out>/ray_results"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint, e.g. http://127.0.0.1:8333"})
    model: str = field(default="efficientnet_lite0", metadata={"choices": list_models(), "help": "registered model"})
    weights: str = field(default="auto", metadata={
        "help": "auto (pretrained where this model's weights are on this machine, else none) | pretrained | "
                "none | PATH (.safetensors)"})
    image_size: int = field(default=0, metadata={"help": "input size override (0: the model's own)"})
    equalize: str = field(default="", metadata={"choices": ["", *EQUALIZE_MODES], "help": "intensity equalisation override"})
    label_set: str = field(default="binary", metadata={"choices": list(LABEL_SETS), "help": "binary or three_class"})
    optimizer: str = field(default="adam", metadata={"choices": list(OPTIMIZERS)})
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = field(default=0.9, metadata={"help": "sgd momentum / rmsprop momentum"})
    scheduler: str = field(default="none", metadata={"choices": list(SCHEDULERS)})
    plateau_factor: float = 0.3
    plateau_patience: int = 2
    min_lr: float = 1e-6
    epochs: int = 10
    batch_size: int = field(default=32, metadata={"help": "batch size per worker"})
    patience: int = field(default=5, metadata={"help": "early stopping: epochs without val-loss improvement (0: off)"})
    min_delta: float = 0.0
    balance: str = field(default="none", metadata={"choices": list(BALANCE)})
    finetune: str = field(default="full", metadata={"choices": list(FINETUNE_MODES)})
    n_blocks: int = field(default=2, metadata={"help": "feature blocks unfrozen by finetune=partial"})
    head_epochs: int = field(default=0, metadata={"help": "two-stage: first N epochs train the head only"})
    rotation: float = field(default=0.0, metadata={"help": "augmentation: max rotation in degrees"})
    shift: float = field(default=0.0, metadata={"help": "augmentation: max shift, fraction of the side"})
    zoom: float = field(default=0.0, metadata={"help": "augmentation: zoom range"})
    hflip: bool = field(default=False, metadata={"help": "augmentation: random horizontal flip"})
    aug_gamma: float = field(default=1.0, metadata={
        "help": "acquisition augmentation: exposure gamma in [1/g, g] (1: off), before equalisation"})
    aug_window: float = field(default=0.0, metadata={
        "help": "acquisition augmentation: grey window, blacks lifted / whites lowered by up to this (0: off)"})
    aug_blur: float = field(default=0.0, metadata={"help": "acquisition augmentation: blur sigma up to N px (0: off)"})
    aug_sharpen: float = field(default=0.0, metadata={"help": "acquisition augmentation: sharpening up to 1+N (0: off)"})
    aug_noise: float = field(default=0.0, metadata={"help": "acquisition augmentation: noise sigma up to N (0: off)"})
    aug_crop: float = field(default=0.0, metadata={
        "help": "acquisition augmentation: field of view, a crop keeping >= this share of the area (0: off)"})
    aug_aspect: float = field(default=1.0, metadata={
        "help": "acquisition augmentation: the crop's aspect ratio in [1/a, a] (1: off)"})
    aug_border: float = field(default=0.0, metadata={
        "help": "acquisition augmentation: collimation-like dark borders up to this share of a side (0: off)"})
    aug_views: int = field(default=0, metadata={
        "help": "cache_features: augmented copies of each training image whose frozen features are cached too, "
                "so the head learns from augmented views (0: off)"})
    aug_families: str = field(default="together", metadata={"choices": list(AUG_FAMILIES), "help": (
        "aug_views: `together` (every copy draws every augmentation) or `alternate` (copies take turns: "
        "the photometric family (gamma, window, blur, sharpen, noise), then the field of view (crop, aspect, "
        "border, geometry); needs aug_views >= 2 and both families)")})
    label_smoothing: float = field(default=0.0, metadata={"help": "targets moved this far toward uniform (0: off)"})
    ema: float = field(default=0.0, metadata={
        "help": "exponential moving average of the weights with this decay per step, evaluated and exported "
                "(e.g. 0.999; 0: off)"})
    val_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0
    limit: int = field(default=0, metadata={
        "help": "train on a sample of about this many images, whole patients, class ratio kept, drawn "
                "before the split (0: all)"})
    num_workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = field(default=0.0, metadata={"help": "> 0 trains on GPU with AMP"})
    threads: int = field(default=0, metadata={"help": "torch threads per worker (0: cpus_per_worker)"})
    precision: str = field(default="auto", metadata={"choices": list(TORCH_PRECISIONS_AUTO), "help": "auto: bf16 where native"})
    channels_last: bool = True
    threshold_method: str = field(default="target_sensitivity", metadata={"choices": list(THRESHOLD_METHODS)})
    target_sensitivity: float = 0.95
    cache_features: bool = field(default=False, metadata={
        "help": "finetune=head on a timm model: compute the frozen backbone's features once, then train the head"})
    tta: str = field(default="none", metadata={
        "choices": ["none", *TTA_MODES], "help": "test-time augmentation baked into the bundle's graph "
                                                 "(hflip: the mean embedding of an image and its mirror)"})
    bn_images: int = field(default=0, metadata={
        "help": "cache_features: re-estimate the frozen backbone's batch-norm statistics on this many training "
                "X-rays first (0: keep ImageNet's)"})
    calibration: str = field(default="none", metadata={
        "choices": list(CALIBRATIONS), "help": "fitted on val, folded into the head: platt (binary) or temperature"})
    max_steps_per_epoch: int = field(default=0, metadata={"help": "cap on training steps per epoch (0: all)"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts allowed"})
    num_to_keep: int = field(default=2, metadata={"help": "checkpoints kept (best by val AUC)"})
    report: bool = field(default=True, metadata={"help": "write the evaluation report and plots"})
    # model options (None: the model's own default; refused for a model that has no such option)
    filters: list[int] | None = field(default=None, metadata={
        "help": "model option (cnn_dropout): filters per conv block, e.g. 32,64,128 (one block each)"})
    dropout: float | None = field(default=None, metadata={"help": "model option (cnn_dropout): dropout rate"})
    batch_norm: bool | None = field(default=None, metadata={"help": "model option (cnn_dropout): batch norm"})
    padding: str | None = field(default=None, metadata={"choices": list(PADDINGS),
                                                        "help": "model option (cnn_dropout): same or valid"})
    stride: int | None = field(default=None, metadata={"help": "model option (cnn_dropout): conv stride 1 or 2"})
    # tracking and the registry (pneumo.track, pneumo.bundle.registry)
    tracking: bool = field(default=True, metadata={"help": "log this run to MLflow (--no-tracking: off)"})
    tracking_uri: str = field(default="", metadata={
        "help": "MLflow tracking URI (sqlite:///..., http://...); default: $MLFLOW_TRACKING_URI, else "
                "sqlite:///<cwd>/mlflow.db"})
    experiment: str = field(default="pneumo", metadata={"help": "MLflow experiment of the run"})
    register: str = field(default="", metadata={"help": "register the bundle as a version of this registered model"})

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("epochs, batch_size and num_workers must be >= 1")
        if not 0 <= self.head_epochs < self.epochs and self.head_epochs:
            raise ConfigError(f"head_epochs={self.head_epochs} must be < epochs={self.epochs}")
        if not 0 < self.target_sensitivity < 1:
            raise ConfigError(f"target_sensitivity={self.target_sensitivity} must be in (0, 1)")
        if self.limit < 0:
            raise ConfigError(f"limit={self.limit}: a number of images >= 0 (0: all)")
        if self.lr < 0 or self.weight_decay < 0:
            raise ConfigError("lr and weight_decay must be >= 0")
        # start-up time: torch only once the numbers are good (a bad --model or --limit is refused without it)
        from pneumo.models.weights import WeightsUnavailable, default_weights, locate_pretrained

        if self.weights == "auto":
            self.weights = default_weights(self.model)
        elif self.weights == "pretrained":
            try:
                locate_pretrained(get_spec(self.model))
            except WeightsUnavailable as exc:
                raise ConfigError(str(exc)) from None
        elif self.weights not in ("none", "") and not is_s3(self.weights) and not os.path.exists(self.weights):
            raise ConfigError(f"weights={self.weights!r}: no such file; valid: auto, pretrained, none or a PATH")
        if JOB_PLACEHOLDER in self.name:  # resolved once, in the driver: workers get the final name
            self.name = self.name.replace(JOB_PLACEHOLDER, job_submission_id())
        if not 0 <= self.label_smoothing < 0.5 or not 0 <= self.ema < 1:
            raise ConfigError(f"label_smoothing in [0, 0.5) and ema in [0, 1) (got {self.label_smoothing}, {self.ema})")
        if self.ema and self.cache_features:
            raise ConfigError("ema averages the weights a fine-tuning run changes; cache_features trains a linear head "
                              "on fixed features: use one or the other")
        if self.image_size and self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size}: need >= 16 (0 keeps the model's)")
        if self.bn_images and not self.cache_features:
            raise ConfigError("bn_images re-estimates a frozen backbone's statistics: it needs cache_features")
        if self.bn_images < 0:
            raise ConfigError(f"bn_images must be >= 0, got {self.bn_images}")
        try:
            augment = self.augment()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.cache_features and (self.finetune != "head" or self.head_epochs):
            raise ConfigError("cache_features needs finetune=head and head_epochs=0: the backbone must be frozen")
        if self.cache_features and augment.enabled != bool(self.aug_views):
            raise ConfigError("cache_features caches each image's features once: augmentation needs aug_views >= 1 "
                              "(augmented copies cached too), and aug_views needs an augmentation")
        if self.aug_views < 0 or (self.aug_views and not self.cache_features):
            raise ConfigError(f"aug_views={self.aug_views}: >= 0, and only with cache_features (fine-tuning "
                              "augments every batch anyway)")
        if self.aug_families == "alternate" and (self.aug_views < 2 or not all(f.enabled for f in augment.families())):
            raise ConfigError(f"aug_families=alternate: copies take turns between the photometric and the field-of-view "
                              f"augmentations, so it needs aug_views >= 2 (got {self.aug_views}) and at least one "
                              "augmentation of each family set")
        if self.cache_features and get_spec(self.model).family not in ("timm", "ensemble"):
            raise ConfigError(f"cache_features works with timm models (forward_features/forward_head); "
                              f"{self.model} is not one")
        self.augment()
        self.model_options()
        if self.register and not self.tracking:
            raise ConfigError("register needs tracking (the registry is MLflow's): drop --no-tracking")

    # derived ------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or Path(self.out.rstrip("/")).name or "pneumo-train"

    @property
    def storage(self) -> str:
        return self.storage_path or os.path.abspath(os.path.join(self.out, "ray_results"))

    # where things are: resolved from the user's strings and --s3-endpoint, here only
    @property
    def data_location(self) -> Location:
        return Location.resolve(self.data, self.s3_endpoint)

    @property
    def out_location(self) -> Location:
        return Location.resolve(self.out, self.s3_endpoint)

    @property
    def storage_location(self) -> Location:
        return Location.resolve(self.storage, self.s3_endpoint)

    def input_spec(self) -> InputSpec:
        spec = get_spec(self.model).input
        changes: dict[str, Any] = {}
        if self.image_size:
            changes["size"] = self.image_size
        if self.equalize:
            changes["equalize"] = self.equalize
        return spec.replace(**changes) if changes else spec

    def augment(self) -> Augment:
        return Augment(self.rotation, self.shift, self.zoom, self.hflip, self.aug_gamma, self.aug_window,
                       self.aug_blur, self.aug_sharpen, self.aug_noise, self.aug_crop, self.aug_aspect,
                       self.aug_border)

    def model_options(self) -> dict[str, Any]:
        """The model options set (`MODEL_OPTIONS` that are not None), checked against the model's own."""
        options = {k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) is not None}
        valid = get_spec(self.model).options
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not an option of {self.model} "
                              f"(its options: {', '.join(sorted(valid)) or 'none'})")
        if options.get("stride", 1) not in (1, 2) or not 0 <= options.get("dropout", 0.0) < 1:
            raise ConfigError("stride must be 1 or 2 and dropout in [0, 1)")
        return options
