"""`pneumo export` and `pneumo quantize`: add the fast engines' files to an existing bundle.

    pneumo export BUNDLE [--data DATA]      add model.onnx (parity-checked on the bundle's val images)
    pneumo quantize BUNDLE [--data DATA]    run the bf16 and int8 gates; add model.int8.onnx if it passes

Both find the bundle's own images by carving the training data exactly as training did (the
manifest's data location, label set, fractions and seed; `--data` when it moved). int8 is
calibrated on training-split images only; every gate (`pneumo.bundle.gates`: ONNX Runtime int8,
OpenVINO fp32, bf16 and int8) runs on the val split: AUC within 0.002 of fp32 and at least 99% of
decisions unchanged at the bundle's threshold. The figures go in the manifest (`gates`) either
way; a bundle whose int8 fails on every engine keeps no int8 file. `pneumo train` runs the same
gates at export, so only bundles from before them need `pneumo quantize`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from pneumo.bundle.gates import run_gates, summary
from pneumo.bundle.manifest import (
    INT8_FILE,
    ONNX_FILE,
    BundleError,
    Manifest,
    add_file,
    read_file,
    read_manifest,
    write_manifest,
)
from pneumo.bundle.store import load_model
from pneumo.config import ConfigError, parse_config
from pneumo.data.datasets import labelled_splits, split_parameters
from pneumo.io.preprocess import DecodeError, load_image
from pneumo.io.storage import Location
from pneumo.models.onnx import ExportError, export_checked


def training_data(manifest: Manifest, bundle: Location) -> Location:
    """Where the bundle's training data was read (its manifest's config), on the bundle's store."""
    recorded = (manifest.training.get("config") or {}).get("data")
    if not recorded:
        raise ConfigError("the bundle does not say where its training data is; pass --data DATA")
    return bundle.at(recorded)


def split_images(manifest: Manifest, split: str, location: Location, limit: int = 256,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8[N, S, S], label index[N]) for up to `limit` images of a split of the bundle's own
    data at `location`, carved exactly as training carved it."""
    params = split_parameters(manifest.training, manifest.classes)
    records = [r for r in labelled_splits(location, **params) if r.split == split]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    images, labels = [], []
    for i in order:
        rec = records[int(i)]
        try:
            images.append(load_image(location.at(rec.path).read_bytes(), rec.path, manifest.input))
        except (DecodeError, OSError):
            continue
        labels.append(manifest.classes.index(rec.label))
        if len(images) >= limit:
            break
    if not images:
        raise ConfigError(f"{location}: no readable {split} images for this bundle")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def export_bundle(location: Location | str, images: np.ndarray | None) -> Manifest:
    """Add a parity-checked `model.onnx` to a bundle (ExportError when parity fails)."""
    manifest = read_manifest(location)
    model = load_model(location, manifest)
    blob, record = export_checked(model, manifest.model, len(manifest.classes), manifest.input, images,
                                  tta=manifest.onnx.get("tta", ()))
    manifest.onnx = record
    add_file(location, manifest, ONNX_FILE, blob)
    write_manifest(location, manifest)
    return manifest


def quantize_bundle(location: Location | str, calibration: np.ndarray, val_images: np.ndarray,
                    val_labels: np.ndarray) -> Manifest:
    """Run every gate on val (int8 quantised on `calibration`, training-split images), record the figures."""
    manifest = read_manifest(location)
    if not manifest.has_onnx:
        raise ConfigError(f"{location} has no {ONNX_FILE}; run `pneumo export {location}` first")
    fp32_bytes = read_file(location, manifest, ONNX_FILE)
    manifest.gates, int8_bytes = run_gates(fp32_bytes, manifest.input, manifest.classes, manifest.threshold_value,
                                           val_images, val_labels, calibration)
    manifest.files.pop(INT8_FILE, None)
    if int8_bytes is not None:
        add_file(location, manifest, INT8_FILE, int8_bytes)
    write_manifest(location, manifest)
    return manifest


# ---------------------------------------------------------------- CLI


@dataclass
class ExportConfig:
    """Add a parity-checked ONNX graph (model.onnx) to an existing bundle."""

    bundle: str = field(metadata={"positional": True, "help": "model bundle folder or s3:// prefix"})
    data: str | None = field(default=None, metadata={"help": "the bundle's training data, if it moved"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    images: int = field(default=256, metadata={"help": "val images for the parity check"})

    def validate(self) -> None:
        if self.images < 1:
            raise ConfigError("images must be >= 1")


@dataclass
class QuantizeConfig:
    """Run the bf16 and int8 gates on val; add an int8 graph (model.int8.onnx, calibrated on training images) if it passes."""

    bundle: str = field(metadata={"positional": True, "help": "model bundle folder or s3:// prefix"})
    data: str | None = field(default=None, metadata={"help": "the bundle's training data, if it moved"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    calibration_images: int = field(default=256, metadata={"help": "training-split images to calibrate on"})
    val_images: int = field(default=2000, metadata={"help": "val images for the gate (at most)"})

    def validate(self) -> None:
        if self.calibration_images < 1 or self.val_images < 1:
            raise ConfigError("calibration_images and val_images must be >= 1")


def _locations(cfg: ExportConfig | QuantizeConfig) -> tuple[Location, Manifest, Location]:
    """The bundle, its manifest and its training data (`--data`, else the manifest's), from the flags."""
    bundle = Location.resolve(cfg.bundle, cfg.s3_endpoint)
    manifest = read_manifest(bundle)
    data = Location.resolve(cfg.data, cfg.s3_endpoint) if cfg.data else training_data(manifest, bundle)
    return bundle, manifest, data


def export_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, prog="pneumo export")
    try:
        bundle, manifest, data = _locations(cfg)
        images, _ = split_images(manifest, "val", data, cfg.images)
        m = export_bundle(bundle, images)
    except (BundleError, ConfigError, ExportError) as exc:
        print(f"pneumo export: {exc}", file=sys.stderr)
        return 1
    p = m.onnx["parity"]
    print(f"pneumo export: wrote {ONNX_FILE} (opset {m.onnx['opset']}); ORT vs torch max |dP| "
          f"{p['max_abs_diff']:.1e} on {p['images']} {p['source']}")
    return 0


def quantize_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(QuantizeConfig, argv, prog="pneumo quantize")
    try:
        bundle, manifest, data = _locations(cfg)
        calib, _ = split_images(manifest, "train", data, cfg.calibration_images)
        val, labels = split_images(manifest, "val", data, cfg.val_images)
        m = quantize_bundle(bundle, calib, val, labels)
    except (BundleError, ConfigError) as exc:
        print(f"pneumo quantize: {exc}", file=sys.stderr)
        return 1
    line = summary(m.gates)
    if not m.has_int8:
        print(f"pneumo quantize: int8 refused on every engine, no {INT8_FILE} kept; {line}", file=sys.stderr)
        return 1
    print(f"pneumo quantize: wrote {INT8_FILE}; {line}; `--engine auto` now picks the fastest that passed")
    return 0
