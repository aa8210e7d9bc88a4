"""Labelled data sets: labels, patient ids, acquisition groups and patient-grouped splits.

Labelled layout: `<root>/{train,val,test}/<CLASS>/*.{jpeg,jpg,png,dcm}`. When `val/` or `test/`
is missing, `labelled_splits` carves it out of `train/` **by patient**, deterministically;
`split_parameters` recovers a bundle's own carve-out from its manifest, so evaluation, export and
quantisation see the very split training held out.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from pneumo.data.listing import IMAGE_EXTENSIONS, DataError, ImageRecord, list_images
from pneumo.io.storage import Location, is_s3
from pneumo.labels import LABEL_SETS

SPLITS: tuple[str, ...] = ("train", "val", "test")

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


# ---------------------------------------------------------------- labels and patients


def patient_id(path: str) -> str:
    """Patient id from a Kermany-style file name; the file stem when the name has no patient part.

    `person1430_bacteria_3695.jpeg` -> `person1430`; `IM-0115-0001.jpeg` -> `IM-0115`;
    `NORMAL2-IM-1427-0001.jpeg` -> `NORMAL2-IM-1427`.
    """
    stem = PurePosixPath(str(path)).stem
    for pattern in (_PERSON, _NORMAL):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def acquisition_group(path: str) -> str:
    """The acquisition series a Kermany-style file name belongs to (for per-group metrics).

    NORMAL files come in two series, `IM-NNNN-NNNN` and `NORMAL2-IM-NNNN-NNNN`; PNEUMONIA files
    are `personN_bacteria_M` or `personN_virus_M`. Anything else is `other`.
    """
    stem = PurePosixPath(str(path)).stem
    m = _PERSON.match(stem)
    if m:
        return m.group(2).lower()
    if _NORMAL.match(stem):
        return "NORMAL2-IM series" if stem.upper().startswith("NORMAL2-") else "IM series"
    return "other"


def label_for(folder_class: str, path: str, label_set: str = "binary") -> str:
    """The label of one file: its class folder, refined by file name for the three-class task."""
    folder_class = folder_class.upper()
    if label_set == "binary":
        if folder_class not in LABEL_SETS["binary"]:
            raise DataError(f"{path}: class folder {folder_class!r} is not one of NORMAL, PNEUMONIA")
        return folder_class
    if label_set == "three_class":
        if folder_class == "NORMAL":
            return "NORMAL"
        m = _PERSON.match(PurePosixPath(str(path)).stem)
        if folder_class in ("BACTERIA", "VIRUS"):
            return folder_class
        if folder_class == "PNEUMONIA" and m:
            return m.group(2).upper()
        raise DataError(f"{path}: cannot tell bacteria from virus (expected personN_bacteria_M or personN_virus_M)")
    raise DataError(f"unknown label set {label_set!r}; valid: {', '.join(LABEL_SETS)}")


def discover(location: Location | str, label_set: str = "binary") -> list[ImageRecord]:
    """Every labelled image under `<root>/{train,val,test}/<CLASS>/`, with split, label and patient."""
    if label_set not in LABEL_SETS:
        raise DataError(f"unknown label set {label_set!r}; valid: {', '.join(LABEL_SETS)}")
    loc = Location.of(location)
    root = loc.path
    out: list[ImageRecord] = []
    for rec in list_images(loc, extensions=IMAGE_EXTENSIONS):
        rel_path = rec.path[len("s3://"):] if loc.is_s3 else rec.path
        rel = PurePosixPath(rel_path.replace(os.sep, "/")).relative_to(PurePosixPath(root.replace(os.sep, "/")))
        parts = rel.parts
        if len(parts) < 3 or parts[0] not in SPLITS:
            continue
        out.append(replace(rec, split=parts[0], label=label_for(parts[1], rec.path, label_set),
                           patient_id=patient_id(rec.path)))
    if not out:
        raise DataError(
            f"{loc}: no labelled images found; expected <root>/{{train,val,test}}/<CLASS>/*.jpeg"
        )
    return out


def labelled_sample(location: Location | str, classes: Sequence[str] = LABEL_SETS["binary"]) -> list[ImageRecord]:
    """A site's labelled sample: a folder with one sub-folder per class (`NORMAL/`, `PNEUMONIA/`,
    any nesting below them), or a CSV with `path` and `label` columns (what `pneumo sample` writes,
    once a radiologist has filled in `label`; relative paths are relative to the CSV's folder).
    Rows whose label is empty are left out; a label that is not one of `classes` is an error."""
    loc = Location.of(location)
    if loc.name.lower().endswith(".csv"):
        return _labelled_csv(loc, classes)
    out: list[ImageRecord] = []
    for rec in list_images(loc, extensions=IMAGE_EXTENSIONS):
        rel = PurePosixPath(rec.path).relative_to(PurePosixPath(loc.uri)) if not loc.is_s3 else \
            PurePosixPath(rec.path[len(loc.uri):].lstrip("/"))
        folder = rel.parts[0].upper() if len(rel.parts) > 1 else ""
        if folder in classes:
            out.append(replace(rec, label=folder, patient_id=patient_id(rec.path)))
    if not out:
        raise DataError(f"{loc}: no labelled images; expected one folder per class ({', '.join(classes)}) "
                        "or a CSV with path and label columns")
    return out


def _labelled_csv(loc: Location, classes: Sequence[str]) -> list[ImageRecord]:
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(loc.read_bytes().decode("utf-8"))))
    if rows and not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{loc}: a labelled CSV needs path and label columns, got {sorted(rows[0])}")
    out: list[ImageRecord] = []
    for i, row in enumerate(rows, 2):  # line numbers as a spreadsheet shows them
        label = (row.get("label") or "").strip().upper()
        if not label:
            continue
        if label not in classes:
            raise DataError(f"{loc} line {i}: label {row['label']!r} is not one of {', '.join(classes)}")
        path = row["path"]
        if not (is_s3(path) or os.path.isabs(path)):
            path = os.path.join(os.path.dirname(loc.uri), path)
        out.append(ImageRecord(loc.at(path).uri, label=label, patient_id=patient_id(path)))
    if not out:
        raise DataError(f"{loc}: no labelled rows (fill in the label column: {', '.join(classes)})")
    return out


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_by_patient(
    records: Iterable[ImageRecord], val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0
) -> list[ImageRecord]:
    """Assign every record to train/val/test so that no patient is in two splits.

    Patients are stratified by their majority label, ordered by a seeded hash of their id, and
    cut at `test_frac` and `val_frac` of each stratum: the same inputs always give the same split.
    """
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"val_frac={val_frac}, test_frac={test_frac}: each in [0, 1) and their sum < 1")
    records = list(records)
    by_patient: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id or patient_id(r.path), []).append(r)
    strata: dict[str, list[str]] = {}
    for pid, recs in by_patient.items():
        labels = [r.label or "" for r in recs]
        # sorted: a tie (e.g. one bacteria and one virus image) must not depend on set order,
        # which changes with PYTHONHASHSEED from process to process
        strata.setdefault(max(sorted(set(labels)), key=labels.count), []).append(pid)
    assignment: dict[str, str] = {}
    for _, pids in sorted(strata.items()):
        pids.sort(key=lambda p: (_unit_hash(f"{seed}:{p}"), p))
        n = len(pids)
        n_test, n_val = round(n * test_frac), round(n * val_frac)
        for i, pid in enumerate(pids):
            assignment[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [replace(r, split=assignment[r.patient_id or patient_id(r.path)]) for r in records]


def limit_sample(records: Sequence[ImageRecord], n: int, seed: int = 0) -> list[ImageRecord]:
    """About `n` of `records`: whole patients (a patient's images stay together), the same share
    of each stratum's images (split folder x the patient's majority label), so the class ratio holds.
    Written here because scikit-learn's group splitters (GroupShuffleSplit, StratifiedGroupKFold) size
    a sample in patients, not images: a seeded patient order per stratum is cut nearest its image share."""
    import numpy as np

    records = list(records)
    if n <= 0 or n >= len(records):
        return records
    by_patient: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        by_patient.setdefault((r.split or "", r.patient_id or patient_id(r.path)), []).append(i)
    strata: dict[tuple[str, str], list[list[int]]] = {}
    for (split, _), idx in sorted(by_patient.items()):
        labels = [records[i].label or "" for i in idx]
        strata.setdefault((split, max(sorted(set(labels)), key=labels.count)), []).append(idx)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for _, patients in sorted(strata.items()):
        target = sum(map(len, patients)) * n / len(records)
        order = rng.permutation(len(patients))
        taken = np.r_[0, np.cumsum([len(patients[o]) for o in order])]
        for o in order[: int(np.argmin(np.abs(taken - target)))]:
            chosen += patients[o]
    return [records[i] for i in sorted(chosen)]


def labelled_splits(
    location: Location | str,
    label_set: str = "binary",
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    limit: int = 0,
) -> list[ImageRecord]:
    """Discover a labelled dataset; carve missing val/test splits out of train by patient. With
    `limit`, first a patient-grouped, class-stratified sample of about that many images (`limit_sample`)."""
    records = limit_sample(discover(location, label_set), limit, seed)
    present = {r.split for r in records}
    if {"val", "test"} <= present:
        return records
    train = [r for r in records if r.split == "train"]
    kept = [r for r in records if r.split != "train"]
    carved = split_by_patient(
        train,
        val_frac=0.0 if "val" in present else val_frac,
        test_frac=0.0 if "test" in present else test_frac,
        seed=seed,
    )
    return sorted(kept + carved, key=lambda r: r.path)


def fingerprint(records: Iterable[ImageRecord]) -> str:
    """sha256 over (path, size, split, label) of every record: identifies the data a run saw."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.path):
        h.update(f"{r.path}\t{r.size}\t{r.split}\t{r.label}\n".encode())
    return h.hexdigest()


def class_counts(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    """{split: {label: count}}."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        split = out.setdefault(r.split or "unsplit", {})
        split[r.label or "unlabelled"] = split.get(r.label or "unlabelled", 0) + 1
    return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}


def split_parameters(
    training: Mapping[str, Any],
    classes: Sequence[str],
    label_set: str | None = None,
    val_frac: float | None = None,
    test_frac: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """label_set, val_frac, test_frac, seed: explicit values, else the bundle's training config
    (so the carve-out matches training's), else the label set matching `classes` and 0.1/0.1/0."""
    cfg = dict(training.get("config") or {})
    by_classes = next((name for name, cs in LABEL_SETS.items() if list(cs) == list(classes)), None)
    out = {
        "label_set": label_set or cfg.get("label_set") or by_classes,
        "val_frac": float(val_frac if val_frac is not None else cfg.get("val_frac", 0.1)),
        "test_frac": float(test_frac if test_frac is not None else cfg.get("test_frac", 0.1)),
        "seed": int(seed if seed is not None else cfg.get("seed", 0)),
        "limit": int(cfg.get("limit") or 0),  # training's sample: the same patients, so the same carve-out
    }
    if out["label_set"] not in LABEL_SETS:
        raise DataError(f"cannot tell the label set for classes {list(classes)}; pass label_set "
                        f"(valid: {', '.join(LABEL_SETS)})")
    missing = set(LABEL_SETS[out["label_set"]]) - set(classes)
    if missing:
        raise DataError(f"label set {out['label_set']!r} has classes {sorted(missing)} the bundle does not "
                        f"predict (bundle classes: {list(classes)})")
    return out
