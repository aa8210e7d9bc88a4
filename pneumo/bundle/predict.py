"""`Predictor`: a model bundle -> class probabilities (and embeddings) for batches of preprocessed images.

Batch scoring (Ray Data actors), serving (Ray Serve replicas), `pneumo evaluate`, training's
final val/test pass and its frozen-feature cache all wrap this one class, so they load the same
bundle the same way and cannot disagree.

    p = Predictor("runs/demo/bundle")                       # or a Location; engine="auto", precision="auto"
    images = np.stack([...])                                # uint8[N, S, S] from pneumo.io.reading
    probs = p.predict(images)                               # float32[N, num_classes]
    probs, feats = p.predict_with_features(images)          # + float32[N, F] pooled embeddings
    p.labels(probs), p.positive_probability(probs), p.engine, p.precision, p.choice
    p.drift_reference()                                     # pneumo.monitor.drift.DriftReference or None

Engines (`engine=`):
- `onnxruntime`: the bundle's verified `model.onnx` (or the gated `model.int8.onnx` with
  `precision="int8"`) on ONNX Runtime's CPU provider, intra-op threads = `threads` (default: the
  actor's or replica's CPUs, which Ray puts in OMP_NUM_THREADS).
- `openvino`: the same files on OpenVINO's CPU plugin, fp32, bf16 (native bf16 CPUs) or int8.
- `torch`: the same scoring graph (`pneumo.models.graph.ScoringModule`) in eager torch, channels_last,
  bf16/fp16 autocast where asked (`pneumo.precision`).
- `auto`: torch on CUDA; on a CPU the fastest engine and precision whose gate passed on this
  bundle (`pneumo.bundle.engines.choose`: a cached micro-benchmark), otherwise torch, with the
  fallback logged and reported in `describe()`.

On the ONNX engines this module never imports torch (a scoring actor starts without it); the
compiled graph is cached per process (`pneumo.models.runtime.engine_session`).
Grad-CAM needs gradients, so `explain_model` is a torch model loaded lazily on first use.
The positive score is `1 - P(NORMAL)` (`pneumo.labels.positive_score`); the bundle's threshold applies to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np

from pneumo import precision as P
from pneumo.bundle.engines import Choice, EngineError, choose
from pneumo.bundle.manifest import (
    INT8_FILE,
    ONNX_FILE,
    Manifest,
    drift_reference,
    read_file,
    read_manifest,
)
from pneumo.io.preprocess import InputSpec, to_array, to_tensor
from pneumo.io.storage import Location
from pneumo.labels import decide, negative_index, positive_score
from pneumo.models.runtime import drop_session, engine_session, run

__all__ = ["Predictor", "EngineError", "resolve_device", "default_threads", "reference_prevalence", "DEVICES"]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MAX_BATCH = 64


def _cuda_possible() -> bool:
    """False where no CUDA device can be visible (so `auto` needs no torch import to say "cpu")."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def resolve_device(device: str = "auto") -> str:
    """`cpu`, `cuda` or `cuda:N` for a requested device (`auto`: CUDA where torch sees it)."""
    device = str(device)
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r}; valid: {', '.join(DEVICES)}, cuda:N")
    if device == "auto":
        if not _cuda_possible():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_threads() -> int:
    """The CPUs this process was given: Ray sets OMP_NUM_THREADS to an actor's/replica's num_cpus."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "0"))) if os.environ.get("OMP_NUM_THREADS") else 0
    except ValueError:
        return 0


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
        self._model_in_memory = self._onnx_in_memory = None
        self._setup(manifest, resolve_device(device), precision, engine, channels_last, max_batch, threads,
                    location=location)
        self.set_prevalence(prevalence)

    @classmethod
    def from_model(cls, model: Any, manifest: Manifest, onnx_bytes: bytes | None = None,
                   engine: str = "auto", device: str = "auto", precision: str = "auto", threads: int = 0,
                   channels_last: bool = True, max_batch: int = DEFAULT_MAX_BATCH) -> Predictor:
        """A Predictor over an in-memory torch model (and its ONNX graph), before any bundle is
        written: training computes its feature cache and chooses the threshold through the very
        path scoring will use."""
        self = cls.__new__(cls)
        self._model_in_memory, self._onnx_in_memory = model, onnx_bytes
        self._setup(manifest, resolve_device(device), precision, engine, channels_last, max_batch, threads)
        self.set_prevalence(None)
        return self

    def _setup(self, manifest: Manifest, device: str, precision: str, engine: str, channels_last: bool,
               max_batch: int, threads: int, location: Location | None = None) -> None:
        self.manifest, self.device, self.location = manifest, device, location
        self.max_batch, self.channels_last = max_batch, channels_last
        self.threads = threads or default_threads()
        self._explain: Any = None
        self._session = self._torch_graph = None
        self._graphs: dict[str, tuple[bytes, str]] = {}
        self.choice: Choice = choose(manifest, engine, precision, device.split(":")[0], self.threads, self._load,
                                     in_memory=location is None)
        self.engine, self.fallback = self.choice.engine, self.choice.fallback
        if self.engine == "torch":
            self._setup_torch(P.resolve(self.choice.precision, _torch_device(device), "torch"))
        else:
            self.precision = self.choice.precision
            self._session = self._load(self.engine, self.precision)
            for name in self.choice.images_per_s:  # the micro-benchmark's other candidates are not kept
                engine, precision = name.split()
                if (engine, precision) != (self.engine, self.precision) and self.choice.how == "benchmark":
                    drop_session(engine, self._graphs[precision][1], precision, self.threads)
            self._graphs = {p: (b"", digest) for p, (_, digest) in self._graphs.items()}  # the session has it
    def _setup_torch(self, precision: str) -> None:
        import torch

        from pneumo.models.graph import scoring_module

        self.precision = precision
        if self.threads and self.device == "cpu":
            torch.set_num_threads(self.threads)
        m = self.manifest
        graph = scoring_module(self._torch_model(), m.model, len(m.classes), m.onnx.get("tta", ()),
                               copy_model=self._model_in_memory is not None).to(self.device)
        self._torch_graph = graph.to(memory_format=torch.channels_last) if self.channels_last else graph

    def _graph(self, precision: str) -> tuple[bytes, str]:
        """(the ONNX graph for `precision`, its sha256), hash-checked against the manifest, read once."""
        if not self._graphs.get(precision, (b"",))[0]:
            name = INT8_FILE if precision == "int8" else ONNX_FILE
            if self._onnx_in_memory is not None and name == ONNX_FILE:
                blob = self._onnx_in_memory
                self._graphs[precision] = blob, hashlib.sha256(blob).hexdigest()
            else:
                self._graphs[precision] = self._read(name), self.manifest.files[name]
        return self._graphs[precision]

    def _load(self, engine: str, precision: str) -> Any:
        """The cached session of `engine` for the graph of `precision` (built on first use)."""
        blob, digest = self._graph(precision)
        return engine_session(engine, blob, precision, self.threads, digest)

    def _read(self, name: str) -> bytes:
        if self.location is None:
            raise EngineError(f"an in-memory Predictor has no {name}")
        return read_file(self.location, self.manifest, name)

    def _torch_model(self) -> Any:
        if self._model_in_memory is not None:
            return self._model_in_memory.eval()
        from pneumo.bundle.store import load_model

        return load_model(self.location, self.manifest, self.device)

    # ---------------------------------------------------------------- properties

    @property
    def session(self) -> Any:
        """The ONNX engine's session (`pneumo.models.runtime.run` takes it), None on torch."""
        return self._session

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
    def explain_model(self) -> Any:
        """A full torch model for Grad-CAM, loaded on first use."""
        if self._explain is None:
            import copy

            in_memory = self._model_in_memory
            self._explain = copy.deepcopy(in_memory).eval() if in_memory is not None else self._torch_model()
        return self._explain

    def drift_reference(self) -> Any:
        """The bundle's `pneumo.monitor.drift.DriftReference` (sha256-checked like the weights), or
        None when the bundle has none (older bundles) or this Predictor is in memory; read once, then cached."""
        if not hasattr(self, "_drift_reference"):
            self._drift_reference = (drift_reference(self.location, self.manifest)
                                     if self.location is not None else None)
        return self._drift_reference

    def to_input(self, images: Any) -> Any:
        """The torch engine's input tensor (on the Predictor's device)."""
        return to_tensor(images, self.spec, device=self.device,
                         channels_last=self.channels_last and self.engine == "torch")

    # ---------------------------------------------------------------- scoring

    def _run(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        if self._session is not None:
            return run(self.engine, self._session, to_array(images, self.spec))
        import torch

        with torch.inference_mode(), P.autocast(_torch_device(self.device), self.precision):
            probs, feats = self._torch_graph(self.to_input(images))
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

    def predict_with_features(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """uint8[N, S, S] -> (float32[N, num_classes] probabilities, float32[N, F] embeddings)."""
        n = len(images)
        if n == 0:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        parts = [self._run(images[s:s + self.max_batch]) for s in range(0, n, self.max_batch)]
        probs = np.concatenate([p for p, _ in parts]).astype(np.float32)
        return self._adjust(probs), np.concatenate([f for _, f in parts]).astype(np.float32)

    def predict(self, images: Any) -> np.ndarray:
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
            "engine_choice": self.choice.to_dict(),
            "prevalence": None if self.prevalence is None else {
                "site": self.prevalence, "reference": self.reference_prevalence},
            "threads": self.threads,
            "device": self.device,
        }


def _torch_device(device: str) -> Any:
    import torch

    return torch.device(device)
