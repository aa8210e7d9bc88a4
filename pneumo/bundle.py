"""The model bundle: the one artifact training writes and scoring and serving read.

A bundle is a directory (local or `s3://`) with two files:

- `model.safetensors`: the weights (no pickle anywhere);
- `manifest.json`: model name and options, classes, input spec, decision threshold, metrics,
  training config and data fingerprint, creation time, library versions, and the weights' sha256.

`load_bundle` refuses an unknown `format_version` and weights whose sha256 differs from the
manifest's, and rebuilds the model through the registry (`pneumo.models.get_model`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pneumo.data import join, read_bytes, write_bytes
from pneumo.preprocess import InputSpec

FORMAT_VERSION = 1
SUPPORTED_FORMATS = (1,)
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


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
    format_version: int = FORMAT_VERSION

    @property
    def threshold_value(self) -> float:
        return float(self.threshold["value"])

    @property
    def negative_index(self) -> int:
        """Index of NORMAL: the positive score is 1 - P(NORMAL), for binary and three-class alike."""
        return self.classes.index("NORMAL") if "NORMAL" in self.classes else 0

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
    for mod in ("ray", "timm", "torchvision"):
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
) -> Manifest:
    """Write `model.safetensors` and `manifest.json` to `out` (a folder or s3:// prefix)."""
    blob = weights_bytes(model)
    digest = hashlib.sha256(blob).hexdigest()
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
    )
    write_bytes(join(out, WEIGHTS_FILE), blob, s3_endpoint)
    write_bytes(join(out, MANIFEST_FILE), json.dumps(manifest.to_dict(), indent=2, default=str).encode(), s3_endpoint)
    return manifest


def read_manifest(location: str, s3_endpoint: str | None = None) -> Manifest:
    try:
        raw = read_bytes(join(location, MANIFEST_FILE), s3_endpoint)
    except (FileNotFoundError, OSError) as exc:
        raise BundleError(f"{location}: no {MANIFEST_FILE} ({exc})") from exc
    try:
        return Manifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{location}: malformed {MANIFEST_FILE} ({exc})") from exc


def load_bundle(location: str, s3_endpoint: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Manifest]:
    """(model in eval mode, manifest) from a bundle; refuses tampered weights and unknown formats."""
    from safetensors.torch import load

    from pneumo.models import get_model

    manifest = read_manifest(location, s3_endpoint)
    try:
        blob = read_bytes(join(location, WEIGHTS_FILE), s3_endpoint)
    except (FileNotFoundError, OSError) as exc:
        raise BundleError(f"{location}: no {WEIGHTS_FILE} ({exc})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.sha256:
        raise BundleError(
            f"{location}: {WEIGHTS_FILE} sha256 {digest[:16]}... does not match the manifest's "
            f"{manifest.sha256[:16]}...; refusing a modified or corrupt bundle"
        )
    model = get_model(manifest.model, len(manifest.classes), weights="none", input_spec=manifest.input,
                      **manifest.model_options)
    try:
        model.load_state_dict(load(blob), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{location}: weights do not fit {manifest.model} ({exc})") from exc
    return model.to(device).eval(), manifest
