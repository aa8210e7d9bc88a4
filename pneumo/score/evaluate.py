"""`pneumo evaluate`: a model bundle on a labelled split, on Ray Data, into an evaluation report.

    pneumo evaluate BUNDLE DATA --split test --out runs/demo/eval [--s3-endpoint URL]

`evaluate_bundle(cfg)` lists the split with the same patient-grouped carve-out training used
(read from the bundle's manifest), then runs the pipeline batch scoring runs
(`pneumo.score.tasks.score_dataset`): `ray.data.from_items` -> `read_and_preprocess` tasks
(`pneumo.io.reading`) -> a `BundlePredictor` actor pool sized by `size_pool`, and back in the
driver joins the labels by path, writes `predictions.csv` and reports at the bundle's own
threshold (`pneumo.report.writer.write_report`). Files that cannot be read or decoded are listed in the
report, never dropped silently.

The positive score is `1 - P(NORMAL)`; a case is called pneumonia when `score >= threshold`.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.bundle.manifest import BundleError, read_manifest
from pneumo.bundle.registry import resolve_bundle
from pneumo.config import ConfigError, parse_config
from pneumo.data.datasets import (
    SPLITS,
    acquisition_group,
    fingerprint,
    labelled_splits,
    split_parameters,
)
from pneumo.data.listing import DataError, ImageRecord
from pneumo.io.storage import Location
from pneumo.labels import LABEL_SETS, decide, positive_score
from pneumo.precision import ENGINES, PRECISIONS
from pneumo.ray_env import ensure_ray
from pneumo.report.writer import summary_table, write_report
from pneumo.score.config import Pipeline
from pneumo.score.tasks import score_dataset


@dataclass
class EvaluateConfig:
    """Evaluate a model bundle on a labelled split: metrics with bootstrap 95% CIs, report and plots."""

    bundle: str = field(metadata={"positional": True,
                                  "help": "model bundle: folder, s3:// prefix, models:/NAME/VERSION or models:/NAME@ALIAS"})
    data: str = field(metadata={"positional": True, "help": "labelled dataset root (folder or s3:// prefix)"})
    split: str = field(default="test", metadata={"choices": list(SPLITS), "help": "split to evaluate"})
    out: str = field(default="eval", metadata={"help": "output folder for report.json, report.md and PNGs"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint, e.g. http://host:8333"})
    batch_size: int = field(default=64, metadata={"help": "images per model call"})
    label_set: str | None = field(default=None, metadata={"choices": list(LABEL_SETS),
                                                          "help": "default: the bundle's training label set"})
    val_frac: float | None = field(default=None, metadata={"help": "carve-out; default: as in training"})
    test_frac: float | None = field(default=None, metadata={"help": "carve-out; default: as in training"})
    seed: int | None = field(default=None, metadata={"help": "carve-out seed; default: as in training"})
    device: str = field(default="auto", metadata={
        "help": "auto (a GPU per model actor where the cluster has GPUs), cpu or cuda"})
    precision: str = field(default="auto", metadata={"choices": list(PRECISIONS)})
    engine: str = field(default="auto", metadata={"choices": list(ENGINES), "help": "auto: ONNX Runtime on CPU"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs"})
    tracking_uri: str = field(default="", metadata={"help": "MLflow registry for models:/ bundles"})

    def validate(self) -> None:
        if self.batch_size < 1 or self.n_boot < 1:
            raise ConfigError("batch_size and n_boot must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r}; valid: auto, cpu, cuda")


def _gpus_per_actor(device: str) -> float:
    """One GPU per model actor for cuda, none for cpu; auto: one where the Ray cluster has GPUs."""
    import ray

    if device == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return 0.0 if device == "cpu" else 1.0


def score_records(cfg: EvaluateConfig, bundle: Location, store: Location, records: Sequence[ImageRecord],
                  spec: Any) -> dict[str, dict[str, Any]]:
    """Batch scoring's Ray Data pipeline (`pneumo.score.tasks.score_dataset`) over `records` (on
    `store`): their output rows (`OUTPUT_SCHEMA`) by path."""
    ensure_ray()
    pipeline = Pipeline(engine=cfg.engine, precision=cfg.precision, batch_size=cfg.batch_size,
                        gpus_per_actor=_gpus_per_actor(cfg.device))
    items = [{"path": r.path, "size_bytes": int(r.size), "mtime_ns": int(r.mtime_ns)} for r in records]
    ds = score_dataset(items, store, spec, bundle, pipeline, run_id="evaluate")
    columns = ["path", "status", "error", "error_kind", "probabilities", "engine", "precision"]
    return {row["path"]: row for row in ds.select_columns(columns).take_all()}


def evaluate_bundle(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate `cfg.bundle` on `cfg.split` of the labelled dataset at `cfg.data`; writes the report to `cfg.out`.

    The split is carved exactly as in training (parameters from the bundle's manifest unless
    given). Writes `predictions.csv` (path, label, score, predicted, per-class probabilities)
    next to the report. Returns the report dict.
    """
    if cfg.split not in SPLITS:
        raise DataError(f"split {cfg.split!r}; valid: {', '.join(SPLITS)}")
    bundle = resolve_bundle(cfg.bundle, cfg.s3_endpoint, cfg.tracking_uri)
    data = Location.resolve(cfg.data, cfg.s3_endpoint)
    manifest = read_manifest(bundle)
    classes = list(manifest.classes)
    params = split_parameters(manifest.training, classes, cfg.label_set, cfg.val_frac, cfg.test_frac, cfg.seed)
    records = labelled_splits(data, **params)
    chosen = [r for r in records if r.split == cfg.split]
    if not chosen:
        present = sorted({r.split for r in records if r.split})
        raise DataError(f"{cfg.data}: no images in split {cfg.split!r} (splits present: {', '.join(present)}; "
                        f"carve-out val_frac={params['val_frac']}, test_frac={params['test_frac']})")
    scored = score_records(cfg, bundle, data, chosen, manifest.input)
    rows: list[ImageRecord] = []
    errors: list[dict[str, str]] = []
    probs_rows = []
    for rec in chosen:  # the listing's order, whatever order the actors finished in
        row = scored[rec.path]
        if row["status"] == "ok":
            rows.append(rec)
            probs_rows.append(np.asarray(row["probabilities"], dtype=np.float32))
        else:
            errors.append({"path": rec.path, "kind": row["error_kind"], "reason": row["error"]})
    probs = np.stack(probs_rows) if probs_rows else np.zeros((0, len(classes)), np.float32)
    y_idx = np.array([classes.index(rec.label) for rec in rows], dtype=np.int64)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    predicted = decide(probs, classes, manifest.threshold_value) if len(probs) else []
    score = positive_score(probs, classes)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "score", "predicted", *[f"p_{c}" for c in classes]])
        for rec, s, p, pr in zip(rows, score, predicted, probs):
            w.writerow([rec.path, rec.label, f"{s:.6f}", p, *[f"{v:.6f}" for v in pr]])
    trained_on = manifest.training.get("data_fingerprint")
    first = scored[chosen[0].path]  # every row carries its actor's engine and precision
    extra = {
        "bundle": {"location": str(cfg.bundle), "model": manifest.model, "version": manifest.version,
                   "sha256": manifest.sha256, "uri": bundle.source},
        "data": str(cfg.data),
        "split_parameters": params,
        "data_fingerprint": fingerprint(records),
        "same_data_as_training": (fingerprint(records) == trained_on) if trained_on else None,
        "predictions": "predictions.csv",
        "engine": first["engine"],
        "precision": first["precision"],
        "device": "cuda" if _gpus_per_actor(cfg.device) else "cpu",
    }
    history = manifest.training.get("history") or None
    return write_report(out, y_idx, probs, classes, manifest.threshold, cfg.split, history, extra,
                        errors=errors, n_boot=cfg.n_boot, groups=[acquisition_group(rec.path) for rec in rows])


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`pneumo evaluate BUNDLE DATA --split test --out DIR [--s3-endpoint URL]`."""
    cfg = parse_config(EvaluateConfig, argv, prog="pneumo evaluate")
    try:
        report = evaluate_bundle(cfg)
    except (DataError, BundleError) as exc:
        print(f"pneumo evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(report))
    print(f"  report: {Path(cfg.out) / 'report.md'} (+ report.json, predictions.csv, "
          f"{', '.join(report['plots'].values())})")
    return 0
