"""`pneumo eda DATA`: describe a labelled data set (local folder or s3:// prefix).

Prints images per split and class (only the splits on disk: nothing is carved here), patients
per split, image width/height and mode statistics from file headers (no full decode), and files
with identical bytes (sha256). Writes into `--out`:

- `eda.json`: everything printed, as data;
- `sample_grid.png`: a few images per class, through `pneumo.io.preprocess.load_image`, i.e. what a
  model with that input size sees;
- `class_balance.png`: images per split and class.

    pneumo eda ../shared/data/chest_xray_224 --out eda_out
    pneumo eda s3://xrays/chest --s3-endpoint http://127.0.0.1:8333 --label-set three_class
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pneumo.config import parse_config
from pneumo.data.datasets import SPLITS, class_counts, discover
from pneumo.data.listing import DataError, ImageRecord
from pneumo.io.preprocess import EQUALIZE_MODES, RESIZE_MODES, InputSpec, sniff_format
from pneumo.io.reading import read_image
from pneumo.io.storage import Location
from pneumo.labels import LABEL_SETS
from pneumo.privacy import log_paths, redact, redact_errors
from pneumo.report import plots


@dataclass(frozen=True)
class FileFacts:
    """What one file's bytes and header say (no pixel decode)."""

    path: str
    nbytes: int
    sha256: str
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


def _header(data: bytes, path: str) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header only."""
    fmt = sniff_format(data, path)
    if fmt == "DICOM":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        mode = f"{ds.get('PhotometricInterpretation', '?')} {ds.get('BitsStored', '?')}-bit"
        return "DICOM", mode, int(ds.Columns), int(ds.Rows)
    with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header, not the pixels
        return img.format or "?", img.mode, img.size[0], img.size[1]


def file_facts(store: Location, record: ImageRecord) -> FileFacts:
    """Hash and header of one file, read through the data set's store."""
    try:
        data = store.at(record.path).read_bytes()
    except OSError as exc:  # a dangling link or an unreadable file is a finding too
        return FileFacts(record.path, 0, "", error=f"{type(exc).__name__}: {exc.strerror or 'cannot read'}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        fmt, mode, w, h = _header(data, record.path)
    except Exception as exc:  # a bad file is a finding, not a crash
        return FileFacts(record.path, len(data), digest, error=f"{type(exc).__name__}: {exc}")
    return FileFacts(record.path, len(data), digest, fmt, mode, w, h)


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {"min": int(arr.min()), "mean": round(float(arr.mean()), 1), "max": int(arr.max())}


def _duplicates(records: list[ImageRecord], facts: list[FileFacts], reveal: bool = False) -> list[dict[str, Any]]:
    """Groups of identical files; `paths` redacted (`pneumo.privacy`) unless `reveal` (the console's --show-paths)."""
    by_hash: dict[str, list[ImageRecord]] = {}
    for rec, f in zip(records, facts):
        if f.sha256:  # files that could not be read have no content to compare
            by_hash.setdefault(f.sha256, []).append(rec)
    groups = []
    for digest, recs in sorted(by_hash.items(), key=lambda kv: kv[1][0].path):
        if len(recs) > 1:
            groups.append({
                "sha256": digest,
                "paths": [r.path if reveal else redact(r.path) for r in recs],
                "cross_split": len({r.split for r in recs}) > 1,
                "cross_patient": len({r.patient_id for r in recs}) > 1,
                "cross_label": len({r.label for r in recs}) > 1,
            })
    return groups


def describe(
    location: Location | str, label_set: str = "binary", workers: int = 8,
    records: list[ImageRecord] | None = None, show_paths: bool = False,
) -> dict[str, Any]:
    """Counts, patients, sizes, modes, formats, unreadable files and duplicates of a labelled data set.
    With `show_paths`, `duplicate_files` holds each duplicate group's real paths: for the console
    only (`main` never writes it to eda.json)."""
    store = Location.of(location)
    records = records if records is not None else discover(store, label_set)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        facts = list(pool.map(lambda r: file_facts(store, r), records))
    ok = [f for f in facts if f.error is None]
    patients: dict[str, set[str]] = {}
    for r in records:
        patients.setdefault(r.split or "unsplit", set()).add(r.patient_id or r.path)
    totals = Counter(r.label for r in records)
    dups = _duplicates(records, facts)
    return {
        "location": str(location),
        "label_set": label_set,
        "classes": list(LABEL_SETS[label_set]),
        "n_images": len(records),
        "counts": {s: c for s, c in sorted(class_counts(records).items(), key=lambda kv: _split_order(kv[0]))},
        "totals": {label: totals.get(label, 0) for label in LABEL_SETS[label_set]},
        "patients": {s: len(p) for s, p in sorted(patients.items())},
        "width": _stats([f.width for f in ok]),
        "height": _stats([f.height for f in ok]),
        "file_bytes": _stats([f.nbytes for f in facts]),
        "modes": dict(Counter(f.mode for f in ok).most_common()),
        "formats": dict(Counter(f.format for f in ok).most_common()),
        "unreadable": redact_errors({"path": f.path, "error": f.error} for f in facts if f.error),
        "duplicates": dups,
        "n_duplicate_copies": sum(len(g["paths"]) - 1 for g in dups),
        **({"duplicate_files": _duplicates(records, facts, reveal=True)} if show_paths or log_paths() else {}),
    }


def pick_samples(records: list[ImageRecord], per_class: int) -> dict[str, list[ImageRecord]]:
    """Up to `per_class` records per label, spread evenly over the sorted list (deterministic)."""
    by_label: dict[str, list[ImageRecord]] = {}
    for r in sorted(records, key=lambda r: r.path):
        by_label.setdefault(r.label or "unlabelled", []).append(r)
    out = {}
    for label, recs in sorted(by_label.items()):
        idx = np.linspace(0, len(recs) - 1, num=min(per_class, len(recs))).round().astype(int)
        # the chosen ones first, then the rest as stand-ins for files that fail to decode
        chosen = [recs[i] for i in dict.fromkeys(idx.tolist())]
        out[label] = chosen + [r for r in recs if r not in chosen]
    return out


def write_sample_grid(
    location: Location | str, out_path: str | os.PathLike, spec: InputSpec, label_set: str = "binary",
    per_class: int = 4, records: list[ImageRecord] | None = None,
) -> Path:
    """A grid of `per_class` images per class as `load_image(..., spec)` returns them."""
    store = Location.of(location)
    records = records if records is not None else discover(store, label_set)
    images: dict[str, list[np.ndarray]] = {}
    captions: dict[str, list[str]] = {}
    for label, candidates in pick_samples(records, per_class).items():
        images[label], captions[label] = [], []
        for rec in candidates[: per_class * 3]:
            if len(images[label]) == per_class:
                break
            res = read_image(store.at(rec.path), spec)  # the one read path; bad files are skipped
            if res.error is not None:
                continue
            images[label].append(res.image)
            captions[label].append(redact(rec.path) if not log_paths() else Path(rec.path).name[:28])
    title = f"as the model sees them: {spec.size}px, resize={spec.resize}, equalize={spec.equalize}"
    return plots.sample_grid(images, out_path, captions=captions, title=title)


# ---------------------------------------------------------------- CLI


@dataclass
class EdaConfig:
    """Describe a labelled data set: counts, sizes, modes, duplicates, PNG charts."""

    data: str = field(metadata={"positional": True, "help": "labelled folder or s3://bucket/prefix"})
    out: str = field(default="eda_out", metadata={"help": "folder for eda.json and the PNGs"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    label_set: str = field(default="binary", metadata={"choices": list(LABEL_SETS), "help": "labels"})
    samples: int = field(default=4, metadata={"help": "images per class in the sample grid"})
    image_size: int = field(default=224, metadata={"help": "model input size for the sample grid"})
    resize: str = field(default="squash", metadata={"choices": list(RESIZE_MODES), "help": "resize mode"})
    equalize: str = field(default="none", metadata={"choices": list(EQUALIZE_MODES), "help": "equalisation"})
    workers: int = field(default=8, metadata={"help": "threads reading files"})
    show_paths: bool = field(default=False, metadata={
        "help": "list every duplicate group's files by full path on this console (file names carry patient "
                "ids: eda.json keeps salted hashes unless PNEUMO_LOG_PATHS=1)"})


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary `pneumo eda` prints."""
    classes = report["classes"]
    lines = [
        f"data: {report['location']}  ({report['label_set']} labels, {report['n_images']:,} images)",
        "",
        "  ".join([f"{'split':<6}", *[f"{c:>10}" for c in classes], f"{'total':>8}", f"{'patients':>9}"]),
    ]
    for split, counts in report["counts"].items():
        row = [f"{split:<6}", *[f"{counts.get(c, 0):>10,}" for c in classes]]
        row += [f"{sum(counts.values()):>8,}", f"{report['patients'].get(split, 0):>9,}"]
        lines.append("  ".join(row))
    if len(report["counts"]) > 1:
        totals = report["totals"]
        lines.append("  ".join([f"{'all':<6}", *[f"{totals[c]:>10,}" for c in classes],
                                f"{report['n_images']:>8,}", f"{sum(report['patients'].values()):>9,}"]))
    lines.append("")
    for key in ("width", "height", "file_bytes"):
        s = report[key]
        if s:
            lines.append(f"{key:<10} min {s['min']:,}  mean {s['mean']:,.1f}  max {s['max']:,}")
    lines.append("modes      " + ", ".join(f"{m} {n:,}" for m, n in report["modes"].items()))
    lines.append("formats    " + ", ".join(f"{m} {n:,}" for m, n in report["formats"].items()))
    bad = report["unreadable"]
    lines.append(f"unreadable {len(bad):,}")
    lines += [f"  {b['path']}: {b['error']}" for b in bad[:20]]
    dups = report["duplicates"]
    lines.append(f"duplicates {len(dups):,} groups of identical files ({report['n_duplicate_copies']:,} extra copies)")
    for g in dups[:20]:
        flags = [k for k in ("cross_split", "cross_patient", "cross_label") if g[k]]
        names = " = ".join(Path(p).name for p in g["paths"])
        lines.append(f"  {names}" + (f"  [{', '.join(flags)}]" if flags else ""))
    if len(dups) > 20:
        lines.append(f"  ... and {len(dups) - 20} more groups (see eda.json)")
    for i, g in enumerate(report.get("duplicate_files") or [], 1):
        lines.append(f"duplicate group {i} (sha256 {g['sha256'][:12]}), {len(g['paths'])} files:")
        lines += [f"  {p}" for p in g["paths"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EdaConfig, argv, prog="pneumo eda")
    try:
        data = Location.resolve(cfg.data, cfg.s3_endpoint)
        records = discover(data, cfg.label_set)
        report = describe(data, cfg.label_set, workers=cfg.workers, records=records, show_paths=cfg.show_paths)
    except DataError as exc:
        print(f"pneumo eda: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = InputSpec(size=cfg.image_size, channels=1, mean=(0.0,), std=(1.0,), resize=cfg.resize, equalize=cfg.equalize)
    grid = write_sample_grid(data, out / "sample_grid.png", spec, cfg.label_set, cfg.samples, records=records)
    balance = plots.class_balance(report["counts"], out / "class_balance.png",
                                  title=f"{Path(cfg.data.rstrip('/')).name}: images per split and class",
                                  labels=report["classes"])
    saved = {k: v for k, v in report.items() if k != "duplicate_files"}  # the real paths: console only
    (out / "eda.json").write_text(json.dumps(saved, indent=2))
    print(format_report(report))
    print(f"\nwrote {out / 'eda.json'}, {grid}, {balance}")
    return 0
