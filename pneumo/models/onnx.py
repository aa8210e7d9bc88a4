"""ONNX export, parity check and int8 quantisation: the fast inference engine's half of a bundle.

    onnx_bytes, parity = export_checked(model, "efficientnet_lite0", 2, spec, val_images)
    int8_bytes = quantize_onnx(onnx_bytes, spec, train_images)

Sessions for the graphs (ONNX Runtime, OpenVINO) are in `pneumo.models.runtime`, without torch.

One graph for every engine: `pneumo.models.graph.ScoringModule` (`x -> (probs, features)`).
Torch runs it eagerly; `torch.onnx.export` writes it (opset 18, dynamic
batch axis) and ONNX Runtime runs the file. The export is refused (and the bundle stays
torch-only) unless ORT's probabilities agree with torch's within `PARITY_TOL` on the images given
(the bundle's own val images at training time).

`quantize_onnx` does static post-training quantisation (QDQ, per-channel int8 weights) calibrated
on images the caller passes: the bundle's own training-split images, never test.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.models.graph import ScoringModule, scoring_module
from pneumo.models.runtime import INPUT_NAME, OUTPUT_NAMES, PARITY_TOL, ort_session, run_session

log = logging.getLogger(__name__)

OPSET = 18


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph disagrees with torch."""


def export_onnx(module: ScoringModule, spec: InputSpec) -> bytes:
    """The scoring graph as ONNX bytes (opset 18, dynamic batch axis), exported offline."""
    module = module.eval().cpu()
    x = torch.zeros((2, spec.channels, spec.size, spec.size), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings and the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(module, (x,), buf, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={INPUT_NAME: {0: "batch"}, "probs": {0: "batch"},
                                            "features": {0: "batch"}},
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
        except Exception as exc:  # noqa: BLE001 - any exporter failure means "no ONNX for this model"
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return buf.getvalue()


def parity_images(spec: InputSpec, n: int = 8, seed: int = 0) -> np.ndarray:
    """Seeded stand-in images for the parity check when no val images are at hand (ad-hoc bundles)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, spec.size, spec.size)).astype(np.float32)
    ramp = np.linspace(0, 255, spec.size, dtype=np.float32)[None, None, :]
    return ((base + ramp) / 2).astype(np.uint8)


def parity(onnx_bytes: bytes, module: ScoringModule, spec: InputSpec, images: np.ndarray,
           batch: int = 32) -> float:
    """Largest |P_ort - P_torch| over `images` (uint8[N, S, S])."""
    session = ort_session(onnx_bytes)
    worst = 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = to_tensor(images[start:start + batch], spec)
            ref = module(x)[0].numpy()
            got = run_session(session, x.numpy())[0]
            worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def export_checked(model: nn.Module, model_name: str, num_classes: int, spec: InputSpec,
                   images: np.ndarray | None = None, tta: Sequence[str] = (),
                   tol: float = PARITY_TOL) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, the manifest's `onnx` record) after a parity check; ExportError when it fails."""
    module = scoring_module(model, model_name, num_classes, tta)
    source = "val images"
    if images is None or len(images) == 0:
        images, source = parity_images(spec), "seeded noise images"
    images = np.asarray(images)[:256]
    blob = export_onnx(module, spec)
    worst = parity(blob, module, spec, images)
    if not worst <= tol:
        raise ExportError(f"ONNX Runtime and torch disagree by {worst:.2e} (> {tol:.0e}) on {len(images)} "
                          f"{source}; the bundle stays torch-only")
    import onnxruntime

    return blob, {"opset": OPSET, "inputs": [INPUT_NAME], "outputs": list(OUTPUT_NAMES), "tta": list(tta),
                  "parity": {"max_abs_diff": worst, "tolerance": tol, "images": len(images), "source": source},
                  "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------- int8


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed uint8 images."""

    def __init__(self, images: np.ndarray, spec: InputSpec, batch: int = 16):
        self.batches = [to_tensor(images[i:i + batch], spec).numpy() for i in range(0, len(images), batch)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT_NAME: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


class _PerTensorFallback(logging.Filter):
    """onnxruntime warns on the root logger for every 1-D weight it quantises per tensor rather than per
    channel ("Axis 1 is out-of-range for weight ..."): expected here, so it goes to this module's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "is out-of-range for weight" in record.getMessage():
            log.debug("%s", record.getMessage())
            return False
        return True


def quantize_onnx(onnx_bytes: bytes, spec: InputSpec, calibration_images: np.ndarray) -> bytes:
    """Static post-training quantisation: QDQ, per-channel int8 weights, uint8 activations (MinMax)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(onnx_bytes)
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation; quantise the raw graph
            log.info("quant_pre_process skipped: %s", exc)
            pre = src
        fallback = _PerTensorFallback()
        logging.getLogger().addFilter(fallback)
        try:
            quantize_static(pre, out, _Calibration(np.asarray(calibration_images), spec),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=_output_nodes(pre))
        finally:
            logging.getLogger().removeFilter(fallback)
        # No `CalibMaxIntermediateOutputs`: in ONNX Runtime 1.32 it clears the buffered min/max
        # without folding them in (onnxruntime#18893, fix open in #32577), so it calibrated on the
        # last few batches only and failed outright on a multiple of its size; the calibrator keeps
        # only each tensor's min and max per batch (the model's own outputs are dropped), so holding
        # all of them costs little.
        with open(out, "rb") as f:
            return f.read()


def _output_nodes(path: str) -> list[str]:
    """Keep the final sigmoid/softmax and the output stack in float: they decide the threshold."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ("Sigmoid", "Softmax", "Concat", "Unsqueeze", "Sub")]
