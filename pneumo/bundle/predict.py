"""`Predictor`: a model bundle -> class probabilities (and embeddings) for batches of preprocessed images.

Batch scoring (Ray Data actors), serving (Ray Serve replicas), `pneumo evaluate` and training's
final val/test pass all wrap this one class, so they load the same bundle the same way and
cannot disagree.

    p = Predictor("runs/demo/bundle")                       # or a Location; engine="auto", precision="auto"
    images = np.stack([...])                                # uint8[N, S, S] from pneumo.io.reading
    probs = p.predict(images)                               # float32[N, num_classes]
    probs, feats = p.predict_with_features(images)          # + float32[N, F] pooled embeddings
    p.labels(probs), p.positive_probability(probs), p.engine, p.precision
    p.drift_reference()                                     # pneumo.monitor.drift.DriftReference or None

Engines (`engine=`):
- `onnxruntime`: the bundle's verified `model.onnx` (or the gated `model.int8.onnx` with
  `precision="int8"`) on ONNX Runtime's CPU provider, intra-op threads = `threads` (default: the
  actor's or replica's CPUs, which Ray puts in OMP_NUM_THREADS).
- `torch`: the same scoring graph (`pneumo.models.graph.ScoringModule`) in eager torch, channels_last,
  bf16/fp16 autocast where asked (`pneumo.precision`).
- `auto`: torch on CUDA; ONNX Runtime on CPU when the bundle has an ONNX file, otherwise torch,
  with the fallback logged and reported in `describe()`.

Grad-CAM needs gradients, so `explain_model` is a torch model loaded lazily on first use.
The positive score is `1 - P(NORMAL)` (`pneumo.labels.positive_score`); the bundle's threshold applies to it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumo import precision as P
from pneumo.bundle.manifest import (
    INT8_FILE,
    ONNX_FILE,
    Manifest,
    drift_reference,
    read_file,
    read_manifest,
)
from pneumo.bundle.store import load_model
from pneumo.config import UserError
from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.io.storage import Location
from pneumo.labels import decide, negative_index, positive_score
from pneumo.models.graph import scoring_module
from pneumo.models.onnx import ort_session, run_session
from pneumo.precision import ENGINES

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MAX_BATCH = 64


class EngineError(UserError, RuntimeError):
    """The engine asked for cannot run this bundle here."""


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device={device!r}; valid: {', '.join(DEVICES)}, cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_threads() -> int:
    """The CPUs this process was given: Ray sets OMP_NUM_THREADS to an actor's/replica's num_cpus."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "0"))) if os.environ.get("OMP_NUM_THREADS") else 0
    except ValueError:
        return 0


def resolve_engine(engine: str, device: torch.device, manifest: Manifest) -> tuple[str, str | None]:
    """(engine, why the auto choice fell back to torch or None)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise EngineError("engine='onnxruntime' runs on the CPU here (no CUDA build of ORT); use device=cpu")
        if not manifest.has_onnx:
            raise EngineError(f"the bundle has no {ONNX_FILE} ({manifest.onnx.get('refused', 'older bundle')}); "
                              "run `pneumo export BUNDLE`, or use --engine torch")
        return engine, None
    if engine == "torch" or device.type == "cuda":
        return "torch", None
    if not manifest.has_onnx:
        return "torch", f"bundle has no {ONNX_FILE} ({manifest.onnx.get('refused', 'run `pneumo export BUNDLE`')})"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return "torch", f"onnxruntime is not importable ({exc})"
    return "onnxruntime", None


def reference_prevalence(manifest: Manifest) -> float:
    """The positive rate the bundle's probabilities assume: val's at calibration, else the training counts'."""
    if manifest.calibration.get("prevalence") is not None:
        return float(manifest.calibration["prevalence"])
    counts = (manifest.training.get("counts") or {}).get("train") or {}
    neg = manifest.classes[negative_index(manifest.classes)]
    total = sum(counts.values())
    return float(1 - counts.get(neg, 0) / total) if total else 0.5


class Predictor:
    """Loads a bundle once; scores `uint8[N, S, S]` batches with the bundle's own input spec."""

    def __init__(
        self,
        bundle: Location | str,
        device: str = "auto",
        precision: str = "auto",
        engine: str = "auto",
        channels_last: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        threads: int = 0,
        prevalence: float | None = None,
    ):
        location = Location.of(bundle)
        manifest = read_manifest(location)
        self._setup(manifest, resolve_device(device), precision, engine, channels_last, max_batch, threads,
                    location=location)
        self.set_prevalence(prevalence)

    @classmethod
    def from_model(cls, model: nn.Module, manifest: Manifest, onnx_bytes: bytes | None = None,
                   engine: str = "auto", device: str = "auto", precision: str = "auto", threads: int = 0,
                   channels_last: bool = True) -> Predictor:
        """A Predictor over an in-memory model (and ONNX graph), before any bundle is written:
        training chooses the threshold through the very path scoring will use."""
        self = cls.__new__(cls)
        self._model_in_memory = model
        self._onnx_in_memory = onnx_bytes
        self._setup(manifest, resolve_device(device), precision, engine, channels_last, DEFAULT_MAX_BATCH, threads)
        self.set_prevalence(None)
        return self

    def _setup(self, manifest: Manifest, device: torch.device, precision: str, engine: str, channels_last: bool,
               max_batch: int, threads: int, location: Location | None = None) -> None:
        self.manifest, self.device, self.location = manifest, device, location
        self.max_batch, self.channels_last = max_batch, channels_last
        self.threads = threads or default_threads()
        self.engine, self.fallback = resolve_engine(engine, device, manifest)
        if self.fallback:
            log.warning("pneumo: engine auto -> torch: %s", self.fallback)
        self.precision = P.resolve(precision, device, self.engine)
        self._explain: nn.Module | None = None
        self._session = self._graph = None
        if self.engine == "onnxruntime":
            if self.precision == "int8" and not manifest.has_int8:
                raise P.PrecisionError("precision='int8': the bundle has no gated model.int8.onnx "
                                       "(run `pneumo quantize BUNDLE`; a model that fails the gate keeps none)")
            name = INT8_FILE if self.precision == "int8" else ONNX_FILE
            in_memory = getattr(self, "_onnx_in_memory", None)
            blob = in_memory if in_memory is not None and name == ONNX_FILE else self._read(name)
            self._session = ort_session(blob, self.threads)
        else:
            if self.threads and device.type == "cpu":
                torch.set_num_threads(self.threads)
            model = self._torch_model()
            graph = scoring_module(model, manifest.model, len(manifest.classes), manifest.onnx.get("tta", ()),
                                   copy_model=hasattr(self, "_model_in_memory")).to(device)
            self._graph = graph.to(memory_format=torch.channels_last) if channels_last else graph

    def _read(self, name: str) -> bytes:
        if self.location is None:
            raise EngineError(f"an in-memory Predictor has no {name}")
        return read_file(self.location, self.manifest, name)

    def _torch_model(self) -> nn.Module:
        in_memory = getattr(self, "_model_in_memory", None)
        if in_memory is not None:
            return in_memory.eval()
        return load_model(self.location, self.manifest, self.device)

    # ---------------------------------------------------------------- properties

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def threshold(self) -> float:
        return self.manifest.threshold_value

    @property
    def explain_model(self) -> nn.Module:
        """A full torch model for Grad-CAM, loaded on first use."""
        if self._explain is None:
            import copy

            in_memory = getattr(self, "_model_in_memory", None)
            self._explain = copy.deepcopy(in_memory).eval() if in_memory is not None else self._torch_model()
        return self._explain

    def drift_reference(self) -> Any:
        """The bundle's `pneumo.monitor.drift.DriftReference` (sha256-checked like the weights), or
        None when the bundle has none (older bundles) or this Predictor is in memory; read once, then cached."""
        if not hasattr(self, "_drift_reference"):
            self._drift_reference = (drift_reference(self.location, self.manifest)
                                     if self.location is not None else None)
        return self._drift_reference

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return to_tensor(images, self.spec, device=self.device,
                         channels_last=self.channels_last and self.engine == "torch")

    # ---------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _run(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self._session is not None:
            return run_session(self._session, to_tensor(images, self.spec).numpy())
        with P.autocast(self.device, self.precision):
            probs, feats = self._graph(self.to_input(images))
        return probs.float().cpu().numpy(), feats.float().cpu().numpy()

    def set_prevalence(self, prevalence: float | None) -> None:
        """Prior-shift correction: the positive rate an operator expects at this site (None: off).

        Posteriors are re-weighted by Bayes' rule from the bundle's reference prevalence (its val
        split's, recorded at calibration, else its training counts) to this one; the threshold
        stays, so decisions move as the posterior does. Opt-in, and reported in `describe()`.
        """
        if prevalence is not None and not 0 < prevalence < 1:
            raise ValueError(f"prevalence={prevalence}: must be in (0, 1)")
        self.prevalence = prevalence
        self.reference_prevalence = reference_prevalence(self.manifest)

    def _adjust(self, probs: np.ndarray) -> np.ndarray:
        if self.prevalence is None:
            return probs
        p, q = self.prevalence, self.reference_prevalence
        ratio = (p / (1 - p)) / (q / (1 - q))
        neg = negative_index(self.classes)
        weights = np.full(probs.shape[1], ratio, dtype=np.float64)
        weights[neg] = 1.0
        out = probs * weights
        return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict_with_features(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8[N, S, S] -> (float32[N, num_classes] probabilities, float32[N, F] embeddings)."""
        n = len(images)
        if n == 0:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        parts = [self._run(images[s:s + self.max_batch]) for s in range(0, n, self.max_batch)]
        probs = np.concatenate([p for p, _ in parts]).astype(np.float32)
        return self._adjust(probs), np.concatenate([f for _, f in parts]).astype(np.float32)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8[N, S, S] -> float32[N, num_classes] probabilities."""
        return self.predict_with_features(images)[0]

    def positive_probability(self, probs: np.ndarray) -> np.ndarray:
        return positive_score(probs, self.classes)

    def labels(self, probs: np.ndarray) -> list[str]:
        return decide(probs, self.classes, self.threshold)

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
            "engine": self.engine,
            "precision": self.precision,
            "engine_fallback": self.fallback,
            "prevalence": None if self.prevalence is None else {
                "site": self.prevalence, "reference": self.reference_prevalence},
            "threads": self.threads,
            "device": str(self.device),
        }
