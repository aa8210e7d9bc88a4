"""The end of `pneumo train`: the best checkpoint -> the model bundle, written once.

    manifest, outputs = export_run(cfg, model, classes, spec, splits, training_info)

1. Export the scoring graph to ONNX in memory, parity-checked on the val images
   (`pneumo.export.export_checked`); a model that fails stays torch-only, and says why.
2. Score val (and the carved test split) once through `Predictor.from_model`: the same engine
   choice batch scoring and serving make (ONNX Runtime on CPU), so the threshold is chosen on the
   very numbers those paths will produce.
3. Choose the threshold on val only; metrics for val and test at that threshold.
4. Build the drift reference (`pneumo.drift.DriftReference`) from the val embeddings and positive
   scores at that threshold; it goes into the bundle as a hash-checked extra file.
5. Write the bundle once: weights, `model.onnx`, the drift reference, then `manifest.json` last
   (each file atomic).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from pneumo.bundle import ONNX_FILE, Manifest, save_bundle
from pneumo.drift import DriftReference
from pneumo.engine import choose_threshold, epoch_metrics
from pneumo.export import ExportError, export_checked
from pneumo.metrics import positive_score
from pneumo.predict import Predictor
from pneumo.preprocess import InputSpec

log = logging.getLogger(__name__)


@dataclass
class RunOutputs:
    probs: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    threshold: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    engine: str


def export_run(cfg: Any, model: nn.Module, classes: list[str], spec: InputSpec,
               splits: dict[str, dict[str, np.ndarray]], training_info: dict[str, Any],
               bundle: str) -> tuple[Manifest, RunOutputs]:
    """Score val/test through the engine, choose the threshold on val, write the bundle once."""
    model = model.eval()
    try:
        onnx: tuple[bytes, dict[str, Any]] | bool = export_checked(model, cfg.model, len(classes), spec,
                                                                    splits["val"]["image"])
    except ExportError as exc:
        log.warning("%s: no ONNX graph, the bundle stays torch-only: %s", cfg.model, exc)
        print(f"[pneumo train] no ONNX graph: {exc}", flush=True)
        onnx = False
    draft = Manifest(model=cfg.model, classes=list(classes), input=spec,
                     onnx=onnx[1] if onnx else {"refused": "export or parity failed"},
                     files={ONNX_FILE: "in-memory"} if onnx else {})
    predictor = Predictor.from_model(model, draft, onnx_bytes=onnx[0] if onnx else None, precision="fp32")
    scored = {s: predictor.predict_with_features(d["image"]) for s, d in splits.items()}
    probs = {s: p for s, (p, _) in scored.items()}
    threshold = choose_threshold(splits["val"]["label"], probs["val"], classes, cfg.threshold_method,
                                 cfg.target_sensitivity)
    metrics = {s: epoch_metrics(splits[s]["label"], probs[s], classes, threshold["value"]) for s in splits}
    extra_files = drift_reference_files(scored["val"][1], positive_score(probs["val"], classes), threshold["value"],
                                        getattr(cfg, "seed", 0))
    manifest = save_bundle(model, bundle, cfg.model, classes, spec, threshold=threshold, metrics=metrics,
                           training=training_info, s3_endpoint=cfg.s3_endpoint, onnx=onnx, extra_files=extra_files)
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
