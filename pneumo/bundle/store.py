"""Writing and loading bundles with torch: the weights, the ONNX graph, the manifest last.

    manifest = save_bundle(model, Location.resolve("runs/demo/bundle"), "seed_cnn", classes, spec)
    model, manifest = load_bundle("runs/demo/bundle")            # eval mode, hash-checked

What a bundle holds and how its files are checked: `pneumo.bundle.manifest`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from typing import Any

import torch
from torch import nn

from pneumo import __version__
from pneumo.bundle.manifest import (
    ONNX_FILE,
    WEIGHTS_FILE,
    BundleError,
    Manifest,
    add_file,
    read_file,
    read_manifest,
    write_manifest,
)
from pneumo.io.preprocess import InputSpec
from pneumo.io.storage import Location
from pneumo.models.factory import get_model
from pneumo.models.onnx import ExportError, export_checked

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {"pneumo": __version__, "torch": torch.__version__}
    for mod in ("ray", "timm", "torchvision", "onnxruntime", "openvino", "onnx"):
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
    out: Location | str,
    model_name: str,
    classes: list[str],
    input_spec: InputSpec,
    threshold: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    version: str | None = None,
    onnx: bool | tuple[bytes, dict[str, Any]] = True,
    parity_images: Any = None,
    extra_files: dict[str, bytes] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write the weights, the ONNX graph and any extra files to `out` (a folder or s3:// prefix), manifest last.

    `onnx`: True exports and parity-checks here (on `parity_images`, uint8[N, S, S]; seeded noise
    when None), a `(bytes, record)` pair from `pneumo.models.onnx.export_checked` is written as is,
    and False writes a torch-only bundle. A model that fails export or parity is saved torch-only,
    with the reason logged and kept in the manifest (`onnx.refused`).
    """
    out = Location.of(out)
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
    out.join(WEIGHTS_FILE).write_bytes(blob)
    for name, data in files.items():
        add_file(out, manifest, name, data)
    write_manifest(out, manifest)
    return manifest


def load_model(location: Location | str, manifest: Manifest, device: str | torch.device = "cpu") -> nn.Module:
    """The torch model (eval mode) from a bundle's verified weights."""
    from safetensors.torch import load

    blob = read_file(location, manifest, WEIGHTS_FILE)
    model = get_model(manifest.model, len(manifest.classes), weights="none", input_spec=manifest.input,
                      **manifest.model_options)
    try:
        model.load_state_dict(load(blob), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{location}: weights do not fit {manifest.model} ({exc})") from exc
    return model.to(device).eval()


def load_bundle(location: Location | str, device: str | torch.device = "cpu") -> tuple[nn.Module, Manifest]:
    """(model in eval mode, manifest) from a bundle; refuses tampered weights and unknown formats."""
    manifest = read_manifest(location)
    return load_model(location, manifest, device), manifest
