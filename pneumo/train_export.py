"""The end of `pneumo train`: the best checkpoint -> the model bundle (written once), reports, summary.

    manifest, outputs = export_run(cfg, model, classes, spec, splits, training_info)

1. Export the scoring graph to ONNX in memory, parity-checked on the val images
   (`pneumo.export.export_checked`); a model that fails stays torch-only, and says why.
2. Score val (and the carved test split) once through `Predictor.from_model`: the same engine
   choice batch scoring and serving make (ONNX Runtime on CPU), so the threshold is chosen on the
   very numbers those paths will produce.
3. Optionally calibrate on val (Platt or temperature scaling, folded into the head's weights, so
   every engine outputs calibrated probabilities), then re-export and re-score.
4. Choose the threshold on val only; metrics for val and test at that threshold.
5. Build the drift reference (`pneumo.drift.DriftReference`) from the val embeddings and positive
   scores at that threshold; it goes into the bundle as a hash-checked extra file.
6. Write the bundle once: weights, `model.onnx`, the drift reference, then `manifest.json` last
   (each file atomic).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pneumo.bundle import ONNX_FILE, Manifest, save_bundle
from pneumo.data import is_s3, join, write_bytes
from pneumo.drift import DriftReference
from pneumo.engine import choose_threshold, epoch_metrics
from pneumo.export import ExportError, export_checked
from pneumo.metrics import positive_score
from pneumo.predict import Predictor
from pneumo.preprocess import InputSpec

log = logging.getLogger(__name__)
CALIBRATIONS = ("none", "platt", "temperature")


@dataclass
class RunOutputs:
    probs: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    threshold: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    engine: str


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


def fit_calibration(method: str, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Platt scaling (binary: a * logit + c, scikit-learn's logistic regression on the val logit) or
    temperature scaling (k classes: logits / T, by minimising the val log-loss with scipy)."""
    from scipy.optimize import minimize_scalar
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels)
    eps = 1e-7
    if method == "platt":
        if len(classes) != 2:
            raise ValueError("platt calibration is for binary bundles; use temperature")
        p = np.clip(probs[:, 1], eps, 1 - eps)
        logit = np.log(p / (1 - p)).reshape(-1, 1)
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit, y)
        return {"method": "platt", "a": float(lr.coef_[0, 0]), "c": float(lr.intercept_[0]), "fitted_on": "val",
                "n": int(len(y)), "prevalence": float(np.mean(y != 0))}
    logp = np.log(np.clip(probs, eps, 1.0))  # softmax logits up to a per-row constant

    def nll(t: float) -> float:
        z = logp / t
        z = z - z.max(axis=1, keepdims=True)
        return float(-np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))))

    t = float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)
    return {"method": "temperature", "temperature": t, "fitted_on": "val", "n": int(len(y)),
            "prevalence": float(np.mean(y != 0))}


def fold_calibration(model: nn.Module, model_name: str, calibration: dict[str, Any]) -> None:
    """Fold the fitted scaling into the classifier's weights: every engine then outputs calibrated
    probabilities with no extra step (a > 0 and T > 0 keep the ranking, so AUC is unchanged)."""
    import torch

    from pneumo.models import get_spec

    head = model.get_submodule(get_spec(model_name).head)
    with torch.no_grad():
        if calibration["method"] == "platt":
            head.weight.mul_(calibration["a"])
            head.bias.mul_(calibration["a"]).add_(calibration["c"])
        else:
            head.weight.div_(calibration["temperature"])
            head.bias.div_(calibration["temperature"])


def export_run(cfg: Any, model: nn.Module, classes: list[str], spec: InputSpec,
               splits: dict[str, dict[str, np.ndarray]], training_info: dict[str, Any],
               bundle: str) -> tuple[Manifest, RunOutputs]:
    """Score val/test through the engine, calibrate and choose the threshold on val, write the bundle once."""
    model = model.eval()
    tta = () if getattr(cfg, "tta", "none") == "none" else (cfg.tta,)
    onnx, predictor, scored = _engine_pass(cfg, model, classes, spec, splits, tta)
    calibration: dict[str, Any] = {"method": "none"}
    if getattr(cfg, "calibration", "none") != "none":
        calibration = fit_calibration(cfg.calibration, splits["val"]["label"], scored["val"][0], classes)
        fold_calibration(model, cfg.model, calibration)
        onnx, predictor, scored = _engine_pass(cfg, model, classes, spec, splits, tta)
    probs = {s: p for s, (p, _) in scored.items()}
    threshold = choose_threshold(splits["val"]["label"], probs["val"], classes, cfg.threshold_method,
                                 cfg.target_sensitivity)
    metrics = {s: epoch_metrics(splits[s]["label"], probs[s], classes, threshold["value"]) for s in splits}
    extra_files = drift_reference_files(scored["val"][1], positive_score(probs["val"], classes), threshold["value"],
                                        getattr(cfg, "seed", 0))
    manifest = save_bundle(model, bundle, cfg.model, classes, spec, threshold=threshold, metrics=metrics,
                           training=training_info, s3_endpoint=cfg.s3_endpoint, onnx=onnx,
                           extra_files=extra_files, extra={"calibration": calibration})
    return manifest, RunOutputs(probs, {s: f for s, (_, f) in scored.items()}, threshold, metrics,
                                predictor.engine)


def drift_reference_files(features: np.ndarray, scores: np.ndarray, threshold: float, seed: int = 0) -> dict[str, bytes]:
    """`{drift_reference.safetensors: bytes}` from the val split, or {} (logged) when val is too small."""
    try:
        return DriftReference.build(features, scores, threshold, seed=seed).to_files()
    except ValueError as exc:
        log.warning("no drift reference in the bundle: %s", exc)
        print(f"[pneumo train] no drift reference: {exc}", flush=True)
        return {}


def write_reports(out: str, splits: dict[str, dict[str, np.ndarray]], probs: dict[str, np.ndarray],
                  classes: list[str], threshold: dict, history: list[dict],
                  skipped: list[dict] | None = None, s3_endpoint: str | None = None) -> dict[str, Any]:
    """The evaluation helper's JSON + Markdown + PNG report for val (and test) under `<out>/report/`
    (written locally, then copied when `out` is s3://)."""
    from pneumo.report import write_report

    errors = [{"path": e["path"], "split": e["split"], "kind": e["error"].split(":")[0],
               "reason": e["error"].partition(": ")[2]} for e in skipped or []]
    with tempfile.TemporaryDirectory() as tmp:
        local = tmp if is_s3(out) else out
        for split, data in splits.items():
            write_report(os.path.join(local, "report", split), data["label"], probs[split], classes, threshold,
                         split, history, {"source": "pneumo train"}, errors=[e for e in errors if e["split"] == split],
                         paths=[str(p) for p in data.get("path", [])])
        if is_s3(out):
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    write_bytes(join(out, *path.relative_to(tmp).parts), path.read_bytes(), s3_endpoint)
    return {s: join(out, "report", s) for s in splits}


def summary_text(s: dict[str, Any]) -> str:
    lines = [f"[pneumo train] done in {s['wall_s']:.0f}s: {s['epochs_run']} epoch(s)"
             + (" (early stopped)" if s["early_stopped"] else "") + f", best epoch {s['best_epoch']}",
             f"  bundle    {s['bundle']} (version {s['version']})",
             f"  threshold {s['threshold']['value']:.4f} ({s['threshold']['method']}"
             + (f", target sensitivity {s['threshold']['target']}" if s["threshold"].get("target") else "")
             + ", chosen on val)"]
    for split, m in s["metrics"].items():
        lines.append(f"  {split:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if s["skipped_files"]:
        lines.append(f"  {s['skipped_files']} undecodable file(s) were left out (see summary.json)")
    return "\n".join(lines)
