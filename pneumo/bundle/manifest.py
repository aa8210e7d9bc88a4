"""The bundle's manifest and its hash-checked files: what a bundle is, readable without torch.

A bundle is a directory (local or `s3://`):

- `model.safetensors`: the weights (no pickle anywhere);
- `model.onnx`: the same model as an ONNX graph `input -> (probs, features)` for ONNX Runtime,
  written only after a parity check against torch (`pneumo.models.onnx`);
- `model.int8.onnx` (optional, `pneumo train` or `pneumo quantize`): the int8 graph, kept only when
  it passed its gate on at least one engine;
- further files named in `files` (e.g. the drift reference);
- `manifest.json`, written **last**: model name and options, classes, input spec, decision
  threshold, metrics, training config and data fingerprint, creation time, library versions, and
  the sha256 of every other file, and `gates`: the reduced-precision gates' figures per engine and
  precision (`{"openvino": {"bf16": {...}, "int8": {...}}, "onnxruntime": {"int8": {...}}}`, each
  with `passed`; `pneumo.bundle.gates`), which say what `--engine auto` may run.

Every file is written atomically (`Location.write_bytes`) and the manifest after the files it
names, so a reader sees the old bundle or the new one. `read_manifest` / `read_file` refuse an
unknown `format_version` and any file whose sha256 differs from the manifest's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pneumo.config import UserError
from pneumo.io.preprocess import InputSpec
from pneumo.io.storage import Location
from pneumo.labels import negative_index
from pneumo.monitor.drift import FILE_NAME, DriftReference

FORMAT_VERSION = 3
SUPPORTED_FORMATS = (1, 2, 3)  # 1: no ONNX (`pneumo export` upgrades it); 2: `int8` instead of `gates`, no lineage
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST_FILE = "manifest.json"


class BundleError(UserError, ValueError):
    """A bundle is missing, malformed, of an unknown format, or tampered with."""


@dataclass
class Manifest:
    """What a bundle says about itself (`manifest.json`)."""

    model: str
    classes: list[str]
    input: InputSpec
    threshold: dict[str, Any] = field(default_factory=lambda: {"value": 0.5, "method": "default", "target": None})
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    version: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, beside the weights
    onnx: dict[str, Any] = field(default_factory=dict)  # export record: opset, outputs, parity; {} = torch only
    gates: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # engine -> precision -> figures
    calibration: dict[str, Any] = field(default_factory=dict)  # fitted on val, folded into the head; prevalence
    lineage: dict[str, Any] = field(default_factory=dict)  # `pneumo calibrate`: the parent bundle, the site sample
    format_version: int = FORMAT_VERSION

    @property
    def threshold_value(self) -> float:
        return float(self.threshold["value"])

    @property
    def has_onnx(self) -> bool:
        return ONNX_FILE in self.files

    @property
    def has_int8(self) -> bool:
        """The bundle keeps a `model.int8.onnx` (it passed its gate on at least one engine)."""
        return INT8_FILE in self.files

    def gate(self, engine: str, precision: str) -> dict[str, Any] | None:
        """The gate's figures for `precision` on `engine` (None: never run on this bundle)."""
        return (self.gates.get(engine) or {}).get(precision)

    @property
    def negative_index(self) -> int:
        """Index of NORMAL (`pneumo.labels.negative_index`)."""
        return negative_index(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"] = self.input.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        fv = d.get("format_version")
        if fv not in SUPPORTED_FORMATS:
            raise BundleError(f"bundle format_version {fv!r} is not supported (supported: {SUPPORTED_FORMATS})")
        legacy_int8 = d.pop("int8", None) if fv in (1, 2) else None
        if legacy_int8:  # format 2 gated int8 on ONNX Runtime only, in a field of its own
            d.setdefault("gates", {}).setdefault("onnxruntime", {})["int8"] = legacy_int8
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"manifest has unknown keys {sorted(unknown)}")
        d["input"] = InputSpec.from_dict(d["input"])
        return cls(**d)


def add_file(location: Location | str, manifest: Manifest, name: str, data: bytes) -> None:
    """Write one file of the bundle and record its sha256 (the caller writes the manifest after)."""
    if name in (WEIGHTS_FILE, MANIFEST_FILE) or "/" in name:
        raise BundleError(f"{name!r} cannot be a bundle's extra file")
    Location.of(location).join(name).write_bytes(data)
    manifest.files[name] = hashlib.sha256(data).hexdigest()


def write_manifest(location: Location | str, manifest: Manifest) -> None:
    """Write `manifest.json` (always in this version's format: an older bundle rewritten is upgraded)."""
    manifest.format_version = FORMAT_VERSION
    Location.of(location).join(MANIFEST_FILE).write_bytes(
        json.dumps(manifest.to_dict(), indent=2, default=str).encode())


def read_manifest(location: Location | str) -> Manifest:
    loc = Location.of(location)
    try:
        raw = loc.join(MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise BundleError(f"{loc}: no {MANIFEST_FILE} ({exc.strerror or type(exc).__name__})") from exc
    try:
        return Manifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{loc}: malformed {MANIFEST_FILE} ({exc})") from exc


def _verified(loc: Location, name: str, expected: str) -> bytes:
    try:
        blob = loc.join(name).read_bytes()
    except OSError as exc:
        raise BundleError(f"{loc}: no {name} ({exc.strerror or type(exc).__name__})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise BundleError(
            f"{loc}: {name} sha256 {digest[:16]}... does not match the manifest's "
            f"{expected[:16]}...; refusing a modified or corrupt bundle"
        )
    return blob


def read_file(location: Location | str, manifest: Manifest, name: str) -> bytes:
    """A file the manifest names, after checking its sha256."""
    loc = Location.of(location)
    if name == WEIGHTS_FILE:
        return _verified(loc, name, manifest.sha256)
    if name not in manifest.files:
        raise BundleError(f"{loc}: the manifest names no {name}")
    return _verified(loc, name, manifest.files[name])


def drift_reference(location: Location | str, manifest: Manifest) -> DriftReference | None:
    """The bundle's `pneumo.monitor.drift.DriftReference` (sha256-checked like the weights), or
    None when it has none (bundles from before drift monitoring). The one loader of it."""
    if FILE_NAME not in manifest.files:
        return None
    return DriftReference.from_bytes(read_file(location, manifest, FILE_NAME))
