"""`Predictor`: a model bundle -> class probabilities for batches of preprocessed images.

Batch scoring (Ray Data actors) and serving (Ray Serve replicas) both wrap this one class, so
they load the same bundle the same way and cannot disagree.

    p = Predictor("runs/demo/bundle", precision="auto")
    images = np.stack([load_image(b, path, p.spec) for b, path in ...])   # uint8[N, S, S]
    probs = p.predict(images)                    # float32[N, num_classes]
    p.labels(probs), p.positive_probability(probs)

The positive score is `1 - P(NORMAL)` (for the three-class task: any pneumonia); the bundle's
threshold applies to it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pneumo.bundle import Manifest, load_bundle
from pneumo.preprocess import InputSpec, to_tensor

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device={device!r}; valid: {', '.join(DEVICES)}, cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_native(device: torch.device) -> bool:
    """True where bf16 matmuls/convs run natively (CUDA with bf16, or a CPU with AVX-512 bf16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context for a precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def logits_to_probs(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One logit -> [1-p, p]; k logits -> softmax. Always float32 [N, num_classes]."""
    logits = logits.float()
    if num_classes == 2:
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def decide(probs: np.ndarray, classes: list[str], threshold: float, negative_index: int = 0) -> list[str]:
    """Labels from probabilities: NORMAL below the threshold on 1 - P(NORMAL), else the likeliest other class."""
    probs = np.asarray(probs)
    positive = 1.0 - probs[:, negative_index]
    others = probs.copy()
    others[:, negative_index] = -1.0
    best = others.argmax(axis=1)
    return [classes[negative_index] if pos < threshold else classes[b] for pos, b in zip(positive, best)]


class Predictor:
    """Loads a bundle once; scores `uint8[N, S, S]` batches with the bundle's own input spec."""

    def __init__(
        self,
        bundle: str,
        s3_endpoint: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool = True,
        max_batch: int = 64,
    ):
        self.device = resolve_device(device)
        self.model, self.manifest = load_bundle(bundle, s3_endpoint, self.device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        self.max_batch = max_batch
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def threshold(self) -> float:
        return self.manifest.threshold_value

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return to_tensor(images, self.spec, device=self.device, channels_last=self.channels_last)

    @torch.inference_mode()
    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8[N, S, S] -> float32[N, num_classes] probabilities."""
        n = len(images)
        if n == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        out = []
        for start in range(0, n, self.max_batch):
            x = self.to_input(images[start : start + self.max_batch])
            with autocast(self.device, self.precision):
                logits = self.model(x)
            out.append(logits_to_probs(logits, len(self.classes)).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def positive_probability(self, probs: np.ndarray) -> np.ndarray:
        return 1.0 - np.asarray(probs)[:, self.manifest.negative_index]

    def labels(self, probs: np.ndarray) -> list[str]:
        return decide(probs, self.classes, self.threshold, self.manifest.negative_index)

    def describe(self) -> dict[str, Any]:
        """Model metadata for answers and output rows."""
        m: Manifest = self.manifest
        return {
            "model": m.model,
            "version": m.version,
            "bundle_sha256": m.sha256,
            "classes": m.classes,
            "threshold": m.threshold,
            "input": m.input.to_dict(),
            "precision": self.precision,
            "device": str(self.device),
        }
