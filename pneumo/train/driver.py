"""`pneumo train`: distributed training with Ray Train, exported as a model bundle.

    pneumo train DATA --out runs/demo [--config ray_jobs/recipes/seed_cnn.yaml] [--epochs 3 ...]

Flow: `pneumo.data.datasets.labelled_splits` (val/test carved by patient when missing) ->
`pneumo.data.ingest.build_datasets` (Ray Data, shared preprocessing, bad files reported) ->
`TorchTrainer(pneumo.train.worker.train_func)` on `num_workers` workers (CPU by default,
`--gpus-per-worker` for GPU with AMP + channels_last), each consuming its
`get_dataset_shard("train")` with on-the-fly augmentation -> per-epoch `ray.train.report` of val
loss / accuracy / AUC / sensitivity / specificity with a rank-0 checkpoint (safetensors + JSON,
best kept by val AUC) -> the best checkpoint becomes `<out>/bundle` with a threshold chosen on
validation predictions only (`pneumo.train.export`) -> `<out>/config.yaml`, `<out>/summary.json`
and the evaluation report under `<out>/report/`.

Re-running with the same `name` and `storage_path` resumes from the latest checkpoint
(Ray Train restores its checkpoint manager from the run folder and `ray.train.get_checkpoint()`
hands it to the workers); a worker failure restarts the group from the latest checkpoint
(`FailureConfig(max_failures)`), so epochs are neither repeated nor skipped.

Fault injection, for tests only: with `PNEUMO_TEST_FAIL_AT_EPOCH=N:MARKER` in the driver's
environment (`fit` forwards it to the workers), the last worker exits at epoch N unless the file
MARKER exists, and creates it first, so the failure happens once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumo import logs
from pneumo.config import ConfigError, config_text, to_dict
from pneumo.data.datasets import fingerprint, labelled_splits
from pneumo.data.ingest import Ingest, build_datasets, oversample, to_numpy
from pneumo.io.preprocess import InputSpec
from pneumo.labels import LABEL_SETS
from pneumo.models.factory import get_model
from pneumo.privacy import redact_errors
from pneumo.ray_env import ensure_ray, wait_for_free_cpu
from pneumo.train.checkpoints import load_weights, read_state
from pneumo.train.config import TrainConfig
from pneumo.train.export import export_run, summary_text, write_reports
from pneumo.train.parts import class_weights_for
from pneumo.train.tracked import close_run, open_run, run_config
from pneumo.train.worker import FAULT_ENV, train_func

__all__ = ["TrainConfig", "fit", "run"]


def fit(cfg: TrainConfig, datasets: dict[str, Any], classes: list[str], spec: InputSpec,
        class_weights: list[float], tracking: dict[str, Any] | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """Run the TorchTrainer; returns the Ray Train `Result`. `tracking`: the MLflow run rank 0 logs
    epochs to (`pneumo.train.tracked`); `callbacks`: Ray Train callbacks (a sweep's TuneReportCallback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.storage_location
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}  # tests: see the docstring
    if logs.interactive():  # the workers' progress bars, drawn here
        env[logs.INTERACTIVE_ENV] = "1"
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": to_dict(cfg), "classes": classes, "spec": spec.to_dict(),
                           "class_weights": class_weights, "sizes": {k: d.count() for k, d in datasets.items()},
                           "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage.path, storage_filesystem=storage.fs if storage.is_s3 else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="val_auc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=list(callbacks) or None,
        ),
        datasets={"train": datasets["train"], "val": datasets["val"]},
    )
    return trainer.fit()


def _ingest(cfg: TrainConfig, classes: list[str], spec: InputSpec) -> tuple[list[Any], Ingest]:
    """The labelled records (checked before Ray starts: data problems are config errors too) and
    their preprocessed splits on Ray Data."""
    data = cfg.data_location
    records = labelled_splits(data, cfg.label_set, cfg.val_frac, cfg.test_frac, cfg.seed, cfg.limit)
    if not any(r.split == "val" for r in records):
        raise ConfigError("no validation images: set val_frac > 0 or provide <data>/val/")
    ensure_ray()
    ingest = build_datasets(records, classes, spec, data, train_spec=cfg.augment().raw_spec(spec))
    for e in redact_errors(ingest.errors):  # file names carry patient ids (pneumo.privacy)
        print(f"[pneumo train] skipped undecodable file {e['path']} ({e['split']}): {e['error']}", file=sys.stderr)
    counts = ingest.counts
    print(f"[pneumo train] {cfg.model} {spec.channels}x{spec.size} on {cfg.num_workers} worker(s); data "
          + ", ".join(f"{s}: " + "/".join(f"{c} {n}" for c, n in counts[s].items()) for s in counts)
          + (f"; {len(ingest.errors)} undecodable file(s) left out" if ingest.errors else ""), flush=True)
    return records, ingest


def _best_model(cfg: TrainConfig, result: Any, classes: list[str], spec: InputSpec) -> tuple[Any, dict, dict]:
    """(the best checkpoint's model, the last checkpoint's state, the best one's state)."""
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
        model = get_model(cfg.model, len(classes), weights="none", input_spec=spec, **cfg.model_options())
        model.load_state_dict(load_weights(d))
    return model, last_state, best_state


def calibration_images(train: Any, counts: dict[str, int], seed: int, n: int = 256) -> np.ndarray | None:
    """Up to `n` training-split images, a seeded sample, that int8 is calibrated on (never val or test)."""
    fraction = min(1.0, 1.5 * n / max(1, sum(counts.values())))
    sample = train.random_sample(fraction, seed=seed).limit(n).select_columns(["image"])
    images = [b["image"] for b in sample.iter_batches(batch_size=n, batch_format="numpy")]
    return np.concatenate(images) if images else None


def run(cfg: TrainConfig, callbacks: Sequence[Any] = (), tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole job: data -> Ray Train -> bundle (+ val-chosen threshold) -> config, report, summary,
    tracked as one MLflow run (`tags` added to it; `callbacks` go to Ray Train, see `fit`)."""
    t0 = time.perf_counter()
    classes = list(LABEL_SETS[cfg.label_set])
    spec = cfg.input_spec()
    records, ingest = _ingest(cfg, classes, spec)
    counts = ingest.counts
    # materialised here, so the workers' shards need no CPU tasks while the workers hold every CPU
    train_ds = ingest.datasets["train"].select_columns(["image", "label"])
    if cfg.balance == "oversample":
        train_ds = oversample(train_ds, counts["train"], classes)
    datasets = {"train": train_ds.materialize(),
                "val": ingest.datasets["val"].select_columns(["image", "label"]).materialize()}
    tracker = open_run(cfg, records, tags)
    try:
        result = fit(cfg, datasets, classes, spec, class_weights_for(counts["train"], classes),
                     run_config(tracker), callbacks)
        model, last_state, best_state = _best_model(cfg, result, classes, spec)
        wait_for_free_cpu()  # the export's datasets (val/test, int8 calibration) need the workers' CPUs back
        summary = _export(cfg, model, last_state, best_state, records, ingest, classes, spec, t0, datasets["train"])
    except BaseException:
        tracker.finish("FAILED")
        raise
    close_run(tracker, cfg, summary, cfg.out_location, summary["sha256"])
    summary["mlflow"] = {"run_id": tracker.run_id, "tracking_uri": tracker.uri} if tracker.on else None
    cfg.out_location.join("summary.json").write_bytes(json.dumps(summary, indent=2, default=str).encode())
    print(summary_text(summary), flush=True)
    return summary


def _export(cfg: TrainConfig, model: Any, last_state: dict, best_state: dict, records: list[Any], ingest: Ingest,
            classes: list[str], spec: InputSpec, t0: float, train: Any) -> dict[str, Any]:
    """The bundle, config.yaml, the reports and summary.json of a finished fit (`train`: the
    training split, int8's calibration images come from it); the summary."""
    counts = ingest.counts
    history = last_state["history"]

    out = cfg.out_location
    bundle = out.join("bundle")
    skipped = redact_errors(ingest.errors)
    training_info = {"config": to_dict(cfg), "epochs_run": last_state["epoch"], "best_epoch": best_state["epoch"],
                     "early_stopped": bool(last_state.get("stopped")), "data_fingerprint": fingerprint(records),
                     "starts": last_state.get("starts", []),
                     "history": history, "skipped_files": skipped, "counts": counts}
    splits = {s: to_numpy(ingest.datasets[s]) for s in ("val", "test") if s in ingest.datasets}
    manifest, scored = export_run(cfg, model, classes, spec, splits, training_info, bundle,
                                  calibration_images(train, counts["train"], cfg.seed))
    threshold, metrics, probs = scored.threshold, scored.metrics, scored.probs
    out.join("config.yaml").write_bytes(config_text(cfg).encode())
    reports = (write_reports(out, splits, probs, classes, threshold, history, skipped, best_state["epoch"])
               if cfg.report else {})
    summary = {"bundle": str(bundle), "version": manifest.version, "model": cfg.model, "threshold": threshold,
               "metrics": metrics, "red_flags": scored.red_flags,
               "epochs_run": last_state["epoch"], "best_epoch": best_state["epoch"],
               "early_stopped": bool(last_state.get("stopped")), "skipped_files": len(ingest.errors),
               "run": {"name": cfg.run_name, "storage_path": cfg.storage}, "wall_s": time.perf_counter() - t0,
               "engine": scored.engine, "onnx": bool(manifest.has_onnx),
               "reports": reports, "sha256": manifest.sha256}
    out.join("summary.json").write_bytes(json.dumps(summary, indent=2, default=str).encode())
    return summary
