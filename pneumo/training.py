"""`pneumo train`: distributed training with Ray Train, exported as a model bundle.

    pneumo train DATA --out runs/demo [--config ray_jobs/recipes/seed_cnn.yaml] [--epochs 3 ...]

Flow: `pneumo.data.labelled_splits` (val/test carved by patient when missing) ->
`pneumo.ingest.build_datasets` (Ray Data, shared preprocessing, bad files reported) ->
`TorchTrainer(pneumo.train_worker.train_func)` on `num_workers` workers (CPU by default, `--gpus-per-worker` for
GPU with AMP + channels_last), each consuming its `get_dataset_shard("train")` with on-the-fly
augmentation -> per-epoch `ray.train.report` of val loss / accuracy / AUC / sensitivity /
specificity with a rank-0 checkpoint (safetensors + JSON, best kept by val AUC) -> the best
checkpoint becomes `<out>/bundle` with a threshold chosen on validation predictions only ->
`<out>/config.yaml`, `<out>/summary.json` and the evaluation report under `<out>/report/`.

Re-running with the same `name` and `storage_path` resumes from the latest checkpoint
(Ray Train restores its checkpoint manager from the run folder and `ray.train.get_checkpoint()`
hands it to the workers); a worker failure restarts the group from the latest checkpoint
(`FailureConfig(max_failures)`), so epochs are neither repeated nor skipped.

Module layout: `pneumo.engine` (one epoch of either loop, loss/optimizer/schedule, metrics),
`pneumo.checkpoints` (epoch checkpoints, resume point), `pneumo.train_worker` (worker setup, the
Ray Train loop) and this module (config, the driver).

Fault injection, for tests only: with `PNEUMO_TEST_FAIL_AT_EPOCH=N:MARKER` in the driver's
environment (`fit` forwards it to the workers), the last worker exits at epoch N unless the file
MARKER exists, and creates it first, so the failure happens once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo import logs
from pneumo.augment import Augment
from pneumo.checkpoints import load_weights, read_state
from pneumo.config import ConfigError, config_text, parse_config, to_dict
from pneumo.data import (
    LABEL_SETS,
    fingerprint,
    is_s3,
    join,
    labelled_splits,
    resolve_filesystem,
    write_bytes,
)
from pneumo.engine import OPTIMIZERS, SCHEDULERS, class_weights_for
from pneumo.export import TTA_MODES
from pneumo.metrics import THRESHOLD_METHODS
from pneumo.models import FINETUNE_MODES, get_model, get_spec, list_models
from pneumo.precision import TORCH_PRECISIONS_AUTO
from pneumo.preprocess import EQUALIZE_MODES, InputSpec
from pneumo.privacy import redact_errors
from pneumo.train_export import CALIBRATIONS

BALANCE = ("none", "weighted_loss", "oversample")


JOB_PLACEHOLDER = "{job}"


def ray_job_submission_id() -> str:
    """The submission id of the Ray job this driver runs in (KubeRay: one per RayJob), read from the
    job config Ray's job supervisor hands its entrypoint; outside a Ray job, a UTC timestamp."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job = str((config.get("metadata") or {}).get("job_submission_id") or "")
    except (ValueError, AttributeError):
        job = ""
    return job or time.strftime("%Y%m%d-%H%M%S", time.gmtime())


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
    val_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0
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

    def validate(self) -> None:
        from pneumo.weights import WeightsUnavailable, default_weights, locate_pretrained

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
            self.name = self.name.replace(JOB_PLACEHOLDER, ray_job_submission_id())
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("epochs, batch_size and num_workers must be >= 1")
        if not 0 <= self.head_epochs < self.epochs and self.head_epochs:
            raise ConfigError(f"head_epochs={self.head_epochs} must be < epochs={self.epochs}")
        if not 0 < self.target_sensitivity < 1:
            raise ConfigError(f"target_sensitivity={self.target_sensitivity} must be in (0, 1)")
        if self.lr < 0 or self.weight_decay < 0:
            raise ConfigError("lr and weight_decay must be >= 0")
        if self.image_size and self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size}: need >= 16 (0 keeps the model's)")
        if self.bn_images and not self.cache_features:
            raise ConfigError("bn_images re-estimates a frozen backbone's statistics: it needs cache_features")
        if self.bn_images < 0:
            raise ConfigError(f"bn_images must be >= 0, got {self.bn_images}")
        if self.cache_features and (self.finetune != "head" or self.head_epochs or self.augment().enabled):
            raise ConfigError("cache_features needs finetune=head, head_epochs=0 and no augmentation "
                              "(rotation/shift/zoom/hflip all off): the backbone must be frozen and its input fixed")
        if self.cache_features and get_spec(self.model).weights_source.split(":")[0] not in ("timm", "package", "ensemble"):
            raise ConfigError(f"cache_features works with timm models (forward_features/forward_head); "
                              f"{self.model} is not one")
        self.augment()

    # derived ------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or Path(self.out.rstrip("/")).name or "pneumo-train"

    @property
    def storage(self) -> str:
        return self.storage_path or os.path.abspath(os.path.join(self.out, "ray_results"))

    def input_spec(self) -> InputSpec:
        spec = get_spec(self.model).input
        changes: dict[str, Any] = {}
        if self.image_size:
            changes["size"] = self.image_size
        if self.equalize:
            changes["equalize"] = self.equalize
        return spec.replace(**changes) if changes else spec

    def augment(self) -> Augment:
        return Augment(self.rotation, self.shift, self.zoom, self.hflip)


# ---------------------------------------------------------------- driver


def _storage(cfg: TrainConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig; local paths are made absolute."""
    if is_s3(cfg.storage):
        fs, path = resolve_filesystem(cfg.storage, cfg.s3_endpoint)
        return path, fs
    return os.path.abspath(cfg.storage), None


def fit(cfg: TrainConfig, datasets: dict[str, Any], classes: list[str], spec: InputSpec,
        class_weights: list[float]) -> Any:
    """Run the TorchTrainer; returns the Ray Train `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pneumo.train_worker import (  # lazy: pneumo.train_worker imports this module
        FAULT_ENV,
        train_func,
    )

    storage_path, storage_fs = _storage(cfg)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    fault = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}  # tests: see the docstring
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": to_dict(cfg), "classes": classes, "spec": spec.to_dict(), "storage": cfg.storage,
                           "class_weights": class_weights},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="val_auc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": fault} if fault else None,
        ),
        datasets={"train": datasets["train"], "val": datasets["val"]},
    )
    return trainer.fit()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole job: data -> Ray Train -> bundle (+ val-chosen threshold) -> config, report, summary."""
    import ray

    from pneumo.ingest import build_datasets, oversample, to_numpy
    from pneumo.train_export import export_run, summary_text, write_reports

    t0 = time.perf_counter()
    classes = list(LABEL_SETS[cfg.label_set])
    spec = cfg.input_spec()
    # data problems are config errors too: found before Ray starts
    records = labelled_splits(cfg.data, cfg.label_set, cfg.val_frac, cfg.test_frac, cfg.seed, cfg.s3_endpoint)
    if not any(r.split == "val" for r in records):
        raise ConfigError("no validation images: set val_frac > 0 or provide <data>/val/")
    if not ray.is_initialized():
        ray.init()
    logs.quiet_ray()
    ingest = build_datasets(records, classes, spec, cfg.s3_endpoint)
    skipped = redact_errors(ingest.errors)  # file names carry patient ids (pneumo.privacy)
    for e in skipped:
        print(f"[pneumo train] skipped undecodable file {e['path']} ({e['split']}): {e['error']}", file=sys.stderr)
    counts = ingest.counts
    print(f"[pneumo train] {cfg.model} {spec.channels}x{spec.size} on {cfg.num_workers} worker(s); data "
          + ", ".join(f"{s}: " + "/".join(f"{c} {n}" for c, n in counts[s].items()) for s in counts)
          + (f"; {len(ingest.errors)} undecodable file(s) left out" if ingest.errors else ""), flush=True)
    # materialised here, so the workers' shards need no CPU tasks while the workers hold every CPU
    train_ds = ingest.datasets["train"].select_columns(["image", "label"])
    if cfg.balance == "oversample":
        train_ds = oversample(train_ds, counts["train"], classes)
    train_ds = train_ds.materialize()
    val_ds = ingest.datasets["val"].select_columns(["image", "label"]).materialize()
    weights = class_weights_for(counts["train"], classes)
    result = fit(cfg, {"train": train_ds, "val": val_ds}, classes, spec, weights)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    latest = result.checkpoint
    best = result.get_best_checkpoint(metric="val_auc", mode="max") or latest
    if latest is None or best is None:
        raise RuntimeError("training produced no checkpoint")
    with latest.as_directory() as d:
        last_state = read_state(d)
    with best.as_directory() as d:
        best_state = read_state(d)
        model = get_model(cfg.model, len(classes), weights="none", input_spec=spec)
        model.load_state_dict(load_weights(d))
    history = last_state["history"]

    out = cfg.out
    bundle = join(out, "bundle")
    training_info = {"config": to_dict(cfg), "epochs_run": last_state["epoch"], "best_epoch": best_state["epoch"],
                     "early_stopped": bool(last_state.get("stopped")), "data_fingerprint": fingerprint(records),
                     "starts": last_state.get("starts", []),
                     "history": history, "skipped_files": skipped, "counts": counts}
    splits = {s: to_numpy(ingest.datasets[s]) for s in ("val", "test") if s in ingest.datasets}
    manifest, scored = export_run(cfg, model, classes, spec, splits, training_info, bundle)
    threshold, metrics, probs = scored.threshold, scored.metrics, scored.probs
    write_bytes(join(out, "config.yaml"), config_text(cfg).encode(), cfg.s3_endpoint)
    reports = (write_reports(out, splits, probs, classes, threshold, history, skipped, cfg.s3_endpoint)
               if cfg.report else {})
    summary = {"bundle": bundle, "version": manifest.version, "model": cfg.model, "threshold": threshold,
               "metrics": metrics, "epochs_run": last_state["epoch"], "best_epoch": best_state["epoch"],
               "early_stopped": bool(last_state.get("stopped")), "skipped_files": len(ingest.errors),
               "run": {"name": cfg.run_name, "storage_path": cfg.storage}, "wall_s": time.perf_counter() - t0,
               "engine": scored.engine, "onnx": bool(manifest.has_onnx),
               "reports": reports}
    write_bytes(join(out, "summary.json"), json.dumps(summary, indent=2, default=str).encode(), cfg.s3_endpoint)
    print(summary_text(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`pneumo train DATA [--config recipe.yaml] [--flags]`."""
    from pneumo.data import DataError

    cfg = parse_config(TrainConfig, argv, prog="pneumo train")
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        print(f"pneumo train: error: {exc}", file=sys.stderr)
        return 2
    return 0
