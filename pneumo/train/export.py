"""The end of `pneumo train`: the best checkpoint -> the model bundle (written once), reports, summary.

    manifest, outputs = export_run(cfg, model, classes, spec, splits, training_info)

1. Export the scoring graph to ONNX in memory, parity-checked on the val images
   (`pneumo.models.onnx.export_checked`); a model that fails stays torch-only, and says why.
2. Score val (and the carved test split) once through `Predictor.from_model` at fp32: the same
   engines batch scoring and serving use (ONNX Runtime or OpenVINO on CPU), so the threshold is
   chosen on the very numbers those paths will produce.
3. Optionally calibrate on val (Platt or temperature scaling, folded into the head's weights, so
   every engine outputs calibrated probabilities), then re-export and re-score.
4. Choose the threshold on val only; metrics for val and test at that threshold, and the val
   split's red flags (`pneumo.report.flags`: the model is no good), kept in the manifest's
   `training.red_flags` for serving to show.
5. Run the reduced-precision gates on val (`pneumo.bundle.gates`: OpenVINO fp32 and bf16, int8
   calibrated on training images on ONNX Runtime and OpenVINO), so the bundle is ready for the
   fastest engine that passed; their figures go in the manifest (`gates`).
6. Build the drift reference (`pneumo.monitor.drift.DriftReference`) from the val embeddings and positive
   scores at that threshold; it goes into the bundle as a hash-checked extra file.
7. Write the bundle once: weights, `model.onnx` (+ `model.int8.onnx` if it passed), the drift
   reference, then `manifest.json` last (each file atomic).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pneumo.bundle.gates import run_gates
from pneumo.bundle.gates import summary as gate_summary
from pneumo.bundle.manifest import INT8_FILE, ONNX_FILE, Manifest
from pneumo.bundle.predict import Predictor
from pneumo.bundle.store import save_bundle
from pneumo.data.datasets import acquisition_group
from pneumo.io.preprocess import InputSpec
from pneumo.io.storage import Location, put_tree
from pneumo.labels import is_positive, positive_score
from pneumo.models.calibration import fit_calibration, fold_calibration
from pneumo.models.onnx import ExportError, export_checked
from pneumo.monitor.drift import DriftReference
from pneumo.report.flags import flags_lines, format_threshold, red_flags
from pneumo.report.metrics import split_metrics
from pneumo.report.thresholds import threshold_record
from pneumo.report.writer import figures, write_report

log = logging.getLogger(__name__)


@dataclass
class RunOutputs:
    probs: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    threshold: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    engine: str
    red_flags: list[str]


def _engine_pass(cfg: Any, model: nn.Module, classes: list[str], spec: InputSpec,
                 splits: dict[str, dict[str, np.ndarray]], tta: tuple[str, ...]) -> tuple[Any, Predictor, dict]:
    """Export (parity-checked on val) and score every split once through the engine."""
    try:
        onnx: tuple[bytes, dict[str, Any]] | bool = export_checked(model, cfg.model, len(classes), spec,
                                                                    splits["val"]["image"], tta=tta)
    except ExportError as exc:
        log.warning("%s: no ONNX graph, the bundle stays torch-only: %s", cfg.model, exc)
        print(f"[pneumo train] no ONNX graph: {exc}", flush=True)
        onnx = False
    draft = Manifest(model=cfg.model, classes=list(classes), input=spec,
                     onnx=onnx[1] if onnx else {"refused": "export or parity failed", "tta": list(tta)},
                     files={ONNX_FILE: "in-memory"} if onnx else {})
    predictor = Predictor.from_model(model, draft, onnx_bytes=onnx[0] if onnx else None, precision="fp32")
    return onnx, predictor, {s: predictor.predict_with_features(d["image"]) for s, d in splits.items()}


def export_run(cfg: Any, model: nn.Module, classes: list[str], spec: InputSpec,
               splits: dict[str, dict[str, np.ndarray]], training_info: dict[str, Any],
               bundle: Location, calibration_images: np.ndarray | None = None) -> tuple[Manifest, RunOutputs]:
    """Score val/test through the engine, calibrate and choose the threshold on val, run the bf16/int8
    gates on val (int8 calibrated on `calibration_images`, training-split images), write the bundle once."""
    model = model.eval()
    tta = () if getattr(cfg, "tta", "none") == "none" else (cfg.tta,)
    onnx, predictor, scored = _engine_pass(cfg, model, classes, spec, splits, tta)
    calibration: dict[str, Any] = {"method": "none"}
    if getattr(cfg, "calibration", "none") != "none":
        calibration = fit_calibration(cfg.calibration, splits["val"]["label"], scored["val"][0], classes)
        fold_calibration(model, cfg.model, calibration)
        onnx, predictor, scored = _engine_pass(cfg, model, classes, spec, splits, tta)
    probs = {s: p for s, (p, _) in scored.items()}
    threshold = threshold_record(splits["val"]["label"], probs["val"], classes, cfg.threshold_method,
                                 cfg.target_sensitivity)
    metrics = {s: split_metrics(splits[s]["label"], probs[s], classes, threshold["value"]) for s in splits}
    flags = val_red_flags(splits["val"]["label"], probs["val"], classes, threshold, getattr(cfg, "seed", 0))
    training_info = {**training_info, "red_flags": flags}
    extra_files = drift_reference_files(scored["val"][1], positive_score(probs["val"], classes), threshold["value"],
                                        getattr(cfg, "seed", 0))
    gates: dict[str, Any] = {}
    if onnx:
        reference = probs["val"] if predictor.engine == "onnxruntime" else None  # the gates' fp32 is ORT's
        gates, int8 = run_gates(onnx[0], spec, classes, threshold["value"], splits["val"]["image"],
                                splits["val"]["label"], calibration_images, reference=reference)
        print(f"[pneumo train] precision gates on {len(splits['val']['label'])} val images: {gate_summary(gates)}",
              flush=True)
        if int8 is not None:
            extra_files[INT8_FILE] = int8
    manifest = save_bundle(model, bundle, cfg.model, classes, spec, threshold=threshold, metrics=metrics,
                           training=training_info, onnx=onnx, model_options=getattr(cfg, "model_options", dict)(),
                           extra_files=extra_files, extra={"calibration": calibration, "gates": gates})
    return manifest, RunOutputs(probs, {s: f for s, (_, f) in scored.items()}, threshold, metrics,
                                predictor.engine, flags)


def val_red_flags(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: dict[str, Any],
                  seed: int = 0) -> list[str]:
    """The val split's red flags at the chosen threshold (bootstrap CIs as in its report)."""
    y, score = is_positive(labels, classes), positive_score(probs, classes)
    return red_flags({**figures(y, score, float(threshold["value"]), 1000, seed, 0.05), "split": "val",
                      "threshold": threshold})


def drift_reference_files(features: np.ndarray, scores: np.ndarray, threshold: float, seed: int = 0) -> dict[str, bytes]:
    """`{drift_reference.safetensors: bytes}` from the val split, or {} (logged) when val is too small."""
    try:
        return DriftReference.build(features, scores, threshold, seed=seed).to_files()
    except ValueError as exc:
        log.warning("no drift reference in the bundle: %s", exc)
        print(f"[pneumo train] no drift reference: {exc}", flush=True)
        return {}


def write_reports(out: Location, splits: dict[str, dict[str, np.ndarray]], probs: dict[str, np.ndarray],
                  classes: list[str], threshold: dict, history: list[dict],
                  skipped: list[dict] | None = None, best_epoch: int | None = None) -> dict[str, Any]:
    """The evaluation helper's JSON + Markdown + PNG report for val (and test) under `<out>/report/`
    (written locally, then copied when `out` is s3://)."""
    errors = [{"path": e["path"], "split": e["split"], "kind": e["error"].split(":")[0],
               "reason": e["error"].partition(": ")[2]} for e in skipped or []]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if out.is_s3 else Path(out.path)
        for split, data in splits.items():
            write_report(local / "report" / split, data["label"], probs[split], classes, threshold,
                         split, history, {"source": "pneumo train"}, errors=[e for e in errors if e["split"] == split],
                         groups=[acquisition_group(str(p)) for p in data.get("path", [])], best_epoch=best_epoch)
        if out.is_s3:
            put_tree(Path(tmp), out)
    return {s: str(out.join("report", s)) for s in splits}


def summary_text(s: dict[str, Any]) -> str:
    lines = [f"[pneumo train] done in {s['wall_s']:.0f}s: {s['epochs_run']} epoch(s)"
             + (" (early stopped)" if s["early_stopped"] else "") + f", best epoch {s['best_epoch']}",
             f"  bundle    {s['bundle']} (version {s['version']})",
             *flags_lines(s.get("red_flags") or []),
             f"  threshold {format_threshold(s['threshold']['value'])} ({s['threshold']['method']}"
             + (f", target sensitivity {s['threshold']['target']}" if s["threshold"].get("target") else "")
             + ", chosen on val)"]
    for split, m in s["metrics"].items():
        lines.append(f"  {split:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    lines.append("  these figures hold for the training cohort; a new site validates locally: "
                 "pneumo sample -> label -> pneumo calibrate (README: Validating at a new site)")
    if s["skipped_files"]:
        lines.append(f"  {s['skipped_files']} undecodable file(s) were left out (see summary.json)")
    return "\n".join(lines)
