"""Reduced precision only where it is proven: the gates a bundle's bf16 and int8 must pass, per engine.

    gates, int8_bytes = run_gates(fp32_onnx, spec, classes, threshold, val_images, val_labels, calibration)
    manifest.gates = gates      # {"onnxruntime": {"int8": {...}}, "openvino": {"fp32": ..., "bf16": ..., "int8": ...}}

Every candidate runs the bundle's own val images; its probabilities are compared with ONNX
Runtime fp32's (the graph parity-checked against torch at export):

- reduced precision (`bf16` on OpenVINO, `int8` on ONNX Runtime and OpenVINO) passes when the val
  AUC is within `MAX_AUC_DROP` of fp32's and at least `MIN_AGREEMENT` of decisions at the bundle's
  threshold are unchanged (`precision_gate`);
- OpenVINO fp32 passes when its probabilities agree within `PARITY_TOL`, as ORT's did with torch's.

int8 is one graph for both engines (`pneumo.models.onnx.quantize_onnx`: static QDQ, calibrated on
training-split images, never val or test), kept when it passes on at least one engine. bf16 is
run only on a CPU with native bf16 (elsewhere it is emulated and slower than fp32): where it is not
run, the record says so and `auto` does not pick it. `pneumo train` runs the gates at export,
`pneumo quantize` on an existing bundle.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pneumo.io.preprocess import InputSpec, to_array
from pneumo.labels import negative_index, positive_score
from pneumo.models.runtime import PARITY_TOL, engine_session, run
from pneumo.precision import cpu_bf16_native
from pneumo.report.metrics import roc_auc

log = logging.getLogger(__name__)

MAX_AUC_DROP = 0.002
MIN_AGREEMENT = 0.99
PARITY_IMAGES = 128
MAX_CALIBRATION_IMAGES = 64  # int8 calibration: the peak memory of 4 batches of 16 before (the ensemble: GBs per 64)
INT8_FORMAT = "QDQ, per-channel int8 weights, uint8 activations (MinMax)"


def precision_gate(fp32: np.ndarray, reduced: np.ndarray, labels: np.ndarray, classes: list[str],
                   threshold: float, max_auc_drop: float = MAX_AUC_DROP,
                   min_agreement: float = MIN_AGREEMENT) -> dict[str, Any]:
    """The gate's figures on val predictions at fp32 and at a reduced precision, and whether it passes."""
    y = (labels != negative_index(classes)).astype(np.int64)
    s32, sr = positive_score(fp32, classes), positive_score(reduced, classes)
    auc32, aucr = roc_auc(y, s32), roc_auc(y, sr)
    agreement = float(np.mean((s32 >= threshold) == (sr >= threshold)))
    drop = float(auc32 - aucr) if np.isfinite(auc32) and np.isfinite(aucr) else float("nan")
    reasons = []
    if not drop <= max_auc_drop:
        reasons.append(f"val AUC {aucr:.4f} vs fp32 {auc32:.4f} (drop {drop:.4f} > {max_auc_drop})")
    if agreement < min_agreement:
        reasons.append(f"{agreement:.1%} of val decisions unchanged (< {min_agreement:.0%})")
    return {"passed": not reasons, "reason": "; ".join(reasons) or None, "auc_fp32": float(auc32),
            "auc": float(aucr), "auc_drop": drop, "agreement": agreement, "val_images": int(len(labels)),
            "max_auc_drop": max_auc_drop, "min_agreement": min_agreement,
            "max_abs_prob_diff": float(np.abs(fp32 - reduced).max()) if len(fp32) else 0.0}


def parity_gate(fp32: np.ndarray, other: np.ndarray, tol: float = PARITY_TOL) -> dict[str, Any]:
    """Another engine's fp32 against ONNX Runtime's: the same graph, so the same numbers within `tol`."""
    worst = float(np.abs(fp32 - other).max()) if len(fp32) else 0.0
    ok = worst <= tol
    return {"passed": ok, "reason": None if ok else f"max |dP| {worst:.2e} vs ONNX Runtime fp32 (> {tol:.0e})",
            "max_abs_prob_diff": worst, "tolerance": tol, "val_images": int(len(fp32))}


def not_run(reason: str) -> dict[str, Any]:
    """The record of a gate that did not run here: `auto` never picks its precision."""
    return {"passed": False, "ran": False, "reason": f"not run: {reason}"}


def _probs(engine: str, blob: bytes, precision: str, x: np.ndarray, threads: int, batch: int = 64) -> np.ndarray:
    import hashlib

    session = engine_session(engine, blob, precision, threads, hashlib.sha256(blob).hexdigest())
    return np.concatenate([run(engine, session, x[s:s + batch])[0] for s in range(0, len(x), batch)])


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not importable ({exc})"
    return None


def run_gates(fp32_onnx: bytes, spec: InputSpec, classes: list[str], threshold: float, val_images: np.ndarray,
              val_labels: np.ndarray, calibration: np.ndarray | None, threads: int = 0,
              bf16_native: bool | None = None,
              reference: np.ndarray | None = None) -> tuple[dict[str, dict[str, Any]], bytes | None]:
    """(the manifest's `gates`, the int8 graph if it passed on any engine) for a bundle's fp32 graph.

    `calibration`: training-split images for int8 (None: no int8). `bf16_native`: whether to run the
    bf16 gate (default: this CPU runs bf16 natively). `reference`: the val probabilities at fp32
    when the caller has them from ONNX Runtime (training's final pass), else computed here."""
    x = to_array(val_images, spec)
    ref = reference if reference is not None else _probs("onnxruntime", fp32_onnx, "fp32", x, threads)
    gates: dict[str, dict[str, Any]] = {"onnxruntime": {}, "openvino": {}}
    int8 = None
    if calibration is not None and len(calibration):
        from pneumo.models.onnx import quantize_onnx

        if len(calibration) > MAX_CALIBRATION_IMAGES:  # the calibrator holds every image's intermediates at once
            calibration = calibration[np.linspace(0, len(calibration) - 1, MAX_CALIBRATION_IMAGES).astype(int)]
        int8 = quantize_onnx(fp32_onnx, spec, calibration)
        calib = {"calibration_images": int(len(calibration)), "calibration_split": "train", "format": INT8_FORMAT}
        gates["onnxruntime"]["int8"] = {**precision_gate(
            ref, _probs("onnxruntime", int8, "int8", x, threads), val_labels, classes, threshold), **calib}
    missing = openvino_missing()
    if missing:
        gates["openvino"] = {p: not_run(missing) for p in ("fp32", "bf16", *(("int8",) if int8 else ()))}
    else:
        n = PARITY_IMAGES  # fp32 is the same arithmetic: fewer images tell (ONNX Runtime's export check uses 256)
        gates["openvino"]["fp32"] = parity_gate(ref[:n], _probs("openvino", fp32_onnx, "fp32", x[:n], threads))
        if bf16_native if bf16_native is not None else cpu_bf16_native():
            gates["openvino"]["bf16"] = precision_gate(ref, _probs("openvino", fp32_onnx, "bf16", x, threads),
                                                       val_labels, classes, threshold)
        else:
            gates["openvino"]["bf16"] = not_run("this CPU has no native bf16 (AVX-512 bf16 / AMX)")
        if int8 is not None:
            gates["openvino"]["int8"] = {**precision_gate(
                ref, _probs("openvino", int8, "int8", x, threads), val_labels, classes, threshold), **calib}
    kept = int8 if int8 is not None and any(g.get("int8", {}).get("passed") for g in gates.values()) else None
    for engine, by_precision in gates.items():
        for precision, g in by_precision.items():
            log.info("gate %s %s: %s%s", engine, precision, "passed" if g["passed"] else "refused",
                     f" ({g['reason']})" if g.get("reason") else "")
    return gates, kept


def summary(gates: dict[str, dict[str, Any]]) -> str:
    """One line: which engine/precision passed, e.g. `onnxruntime int8 passed, openvino bf16 refused (...)`."""
    parts = []
    for engine, by_precision in sorted(gates.items()):
        for precision, g in by_precision.items():
            if "auc" in g:
                figures = f"val AUC {g['auc']:.4f} vs fp32 {g['auc_fp32']:.4f}, {g['agreement']:.2%} unchanged"
            else:
                figures = g.get("reason") or f"max |dP| {g.get('max_abs_prob_diff', 0):.1e}"
            verdict = "passed" if g["passed"] else ("not run" if g.get("ran") is False else "refused")
            parts.append(f"{engine} {precision} {verdict} ({figures})")
    return "; ".join(parts)
