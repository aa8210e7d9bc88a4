"""The model bundle: the one artifact training writes and scoring and serving read.

A bundle is a directory (local or `s3://`):

- `model.safetensors`: the weights (no pickle anywhere);
- `model.onnx`: the same model as an ONNX graph `input -> (probs, features)` for ONNX Runtime,
  written only after a parity check against torch (`pneumo.export`);
- `model.int8.onnx` (optional, `pneumo quantize`): the int8 graph, kept only when it passed its gate;
- further files named in `files` (e.g. the drift reference);
- `manifest.json`, written **last**: model name and options, classes, input spec, decision
  threshold, metrics, training config and data fingerprint, creation time, library versions, and
  the sha256 of every other file.

Every file is written atomically (`pneumo.data.write_bytes`) and the manifest after the files it
names, so a reader sees the old bundle or the new one. `load_bundle` / `read_file` refuse an
unknown `format_version` and any file whose sha256 differs from the manifest's.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pneumo.data import join, read_bytes, write_bytes
from pneumo.preprocess import InputSpec

FORMAT_VERSION = 2
SUPPORTED_FORMATS = (1, 2)  # 1: no ONNX; `pneumo export` upgrades it
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST_FILE = "manifest.json"

log = logging.getLogger(__name__)


class BundleError(ValueError):
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
    int8: dict[str, Any] = field(default_factory=dict)  # quantisation gate figures; `passed` says if kept
    calibration: dict[str, Any] = field(default_factory=dict)  # fitted on val, folded into the head; prevalence
    format_version: int = FORMAT_VERSION

    @property
    def threshold_value(self) -> float:
        return float(self.threshold["value"])

    @property
    def has_onnx(self) -> bool:
        return ONNX_FILE in self.files

    @property
    def has_int8(self) -> bool:
        return INT8_FILE in self.files and bool(self.int8.get("passed"))

    @property
    def negative_index(self) -> int:
        """Index of NORMAL (`pneumo.metrics.negative_index`)."""
        from pneumo.metrics import negative_index

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
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"manifest has unknown keys {sorted(unknown)}")
        d["input"] = InputSpec.from_dict(d["input"])
        return cls(**d)


def _versions() -> dict[str, str]:
    import pneumo

    out = {"pneumo": pneumo.__version__, "torch": torch.__version__}
    for mod in ("ray", "timm", "torchvision", "onnxruntime", "onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional at bundle time
            pass
    return out


def weights_bytes(model: nn.Module) -> bytes:
    """The model's state dict serialised as safetensors (tensors copied, so shared storage is fine)."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def save_bundle(
    model: nn.Module,
    out: str,
    model_name: str,
    classes: list[str],
    input_spec: InputSpec,
    threshold: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    version: str | None = None,
    s3_endpoint: str | None = None,
    onnx: bool | tuple[bytes, dict[str, Any]] = True,
    parity_images: Any = None,
    extra_files: dict[str, bytes] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write the weights, the ONNX graph and any extra files to `out` (a folder or s3:// prefix), manifest last.

    `onnx`: True exports and parity-checks here (on `parity_images`, uint8[N, S, S]; seeded noise
    when None), a `(bytes, record)` pair from `pneumo.export.export_checked` is written as is, and
    False writes a torch-only bundle. A model that fails export or parity is saved torch-only,
    with the reason logged and kept in the manifest (`onnx.refused`).
    """
    from pneumo.export import ExportError, export_checked

    blob = weights_bytes(model)
    digest = hashlib.sha256(blob).hexdigest()
    files = dict(extra_files or {})
    onnx_record: dict[str, Any] = {}
    if onnx is True:
        try:
            files[ONNX_FILE], onnx_record = export_checked(model, model_name, len(classes), input_spec, parity_images)
        except ExportError as exc:
            log.warning("%s: no ONNX graph, the bundle stays torch-only: %s", model_name, exc)
            onnx_record = {"refused": str(exc)}
    elif isinstance(onnx, tuple):
        files[ONNX_FILE], onnx_record = onnx
    manifest = Manifest(
        model=model_name,
        classes=list(classes),
        input=input_spec,
        threshold=dict(threshold or {"value": 0.5, "method": "default", "target": None}),
        metrics=metrics or {},
        training=training or {},
        model_options={k: list(v) if isinstance(v, tuple) else v for k, v in (model_options or {}).items()},
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        versions=_versions(),
        sha256=digest,
        version=version or digest[:12],
        onnx=onnx_record,
        **(extra or {}),
    )
    write_bytes(join(out, WEIGHTS_FILE), blob, s3_endpoint)
    for name, data in files.items():
        add_file(out, manifest, name, data, s3_endpoint)
    write_manifest(out, manifest, s3_endpoint)
    return manifest


def add_file(location: str, manifest: Manifest, name: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write one file of the bundle and record its sha256 (the caller writes the manifest after)."""
    if name in (WEIGHTS_FILE, MANIFEST_FILE) or "/" in name:
        raise BundleError(f"{name!r} cannot be a bundle's extra file")
    write_bytes(join(location, name), data, s3_endpoint)
    manifest.files[name] = hashlib.sha256(data).hexdigest()


def write_manifest(location: str, manifest: Manifest, s3_endpoint: str | None = None) -> None:
    write_bytes(join(location, MANIFEST_FILE), json.dumps(manifest.to_dict(), indent=2, default=str).encode(),
                s3_endpoint)


def read_manifest(location: str, s3_endpoint: str | None = None) -> Manifest:
    try:
        raw = read_bytes(join(location, MANIFEST_FILE), s3_endpoint)
    except (FileNotFoundError, OSError) as exc:
        raise BundleError(f"{location}: no {MANIFEST_FILE} ({exc})") from exc
    try:
        return Manifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{location}: malformed {MANIFEST_FILE} ({exc})") from exc


def _verified(location: str, name: str, expected: str, s3_endpoint: str | None) -> bytes:
    try:
        blob = read_bytes(join(location, name), s3_endpoint)
    except (FileNotFoundError, OSError) as exc:
        raise BundleError(f"{location}: no {name} ({exc})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise BundleError(
            f"{location}: {name} sha256 {digest[:16]}... does not match the manifest's "
            f"{expected[:16]}...; refusing a modified or corrupt bundle"
        )
    return blob


def read_file(location: str, manifest: Manifest, name: str, s3_endpoint: str | None = None) -> bytes:
    """A file the manifest names, after checking its sha256."""
    if name == WEIGHTS_FILE:
        return _verified(location, name, manifest.sha256, s3_endpoint)
    if name not in manifest.files:
        raise BundleError(f"{location}: the manifest names no {name}")
    return _verified(location, name, manifest.files[name], s3_endpoint)


def load_model(location: str, manifest: Manifest, s3_endpoint: str | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The torch model (eval mode) from a bundle's verified weights."""
    from safetensors.torch import load

    from pneumo.models import get_model

    blob = read_file(location, manifest, WEIGHTS_FILE, s3_endpoint)
    model = get_model(manifest.model, len(manifest.classes), weights="none", input_spec=manifest.input,
                      **manifest.model_options)
    try:
        model.load_state_dict(load(blob), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{location}: weights do not fit {manifest.model} ({exc})") from exc
    return model.to(device).eval()


def load_bundle(location: str, s3_endpoint: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Manifest]:
    """(model in eval mode, manifest) from a bundle; refuses tampered weights and unknown formats."""
    manifest = read_manifest(location, s3_endpoint)
    return load_model(location, manifest, s3_endpoint, device), manifest
