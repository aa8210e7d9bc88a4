"""Ray Data ingest for training and evaluation: records -> preprocessed `uint8[S, S]` rows.

    records = labelled_splits(root, "binary", val_frac, test_frac, seed)
    data = build_datasets(records, classes, spec, Location.resolve(root))   # Ingest
    data.datasets["train"], data.datasets["val"], data.errors

Each split is `ray.data.from_items(records)` followed by one `map_batches` that reads the bytes
(local or S3) through the one read path `pneumo.io.reading.read_image`; rows are
`{image: uint8[S, S], label: int, path: str}` and are materialised in the object store (the
224 px data set is ~5k x 50 KB). Files that cannot be read or decoded are **not** silently
dropped: they are counted, listed in `Ingest.errors` and logged, then left out of training.
Augmentation and normalisation happen later, in the Ray Train worker.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumo.data.listing import ImageRecord
from pneumo.io.preprocess import InputSpec
from pneumo.io.reading import read_image
from pneumo.io.storage import Location

log = logging.getLogger(__name__)

def load_batch(batch: dict[str, np.ndarray], spec: dict, store: Location) -> dict[str, np.ndarray]:
    """`map_batches` function: {path, label} -> {image, label, path, error, error_kind}
    (both "" when fine), through the one read path `pneumo.io.reading.read_image`; `store` is
    the data's location (the S3 endpoint its paths are read through)."""
    input_spec = InputSpec.from_dict(spec)
    n = len(batch["path"])
    images = np.zeros((n, input_spec.size, input_spec.size), dtype=np.uint8)
    errors, kinds = [], []
    for i, path in enumerate(batch["path"]):
        res = read_image(store.at(str(path)), input_spec)
        if res.error is None:
            images[i] = res.image
        errors.append(f"{res.error.kind}: {res.error.message}" if res.error else "")
        kinds.append(res.error.kind if res.error else "")
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64),
            "path": np.asarray(batch["path"]), "error": np.asarray(errors), "error_kind": np.asarray(kinds)}


@dataclass
class Ingest:
    """The preprocessed splits plus what could not be used."""

    datasets: dict[str, Any]  # split -> materialised ray.data.Dataset of {image, label, path}
    counts: dict[str, dict[str, int]]  # split -> class -> usable images
    errors: list[dict[str, str]] = field(default_factory=list)  # {path, split, kind, error="kind: message"}


def read_split(records: list[ImageRecord], classes: list[str], spec: InputSpec, store: Location):
    """One split as a materialised Ray Dataset with an `error` column (see `build_datasets`)."""
    import ray.data

    items = [{"path": r.path, "label": classes.index(r.label)} for r in records]
    blocks = max(1, min(32, len(items) // 32))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    return ds.map_batches(load_batch, batch_size=32, fn_kwargs={"spec": spec.to_dict(), "store": store}).materialize()


def build_datasets(records: list[ImageRecord], classes: list[str], spec: InputSpec, store: Location,
                   train_spec: InputSpec | None = None) -> Ingest:
    """Preprocess every split of `records` with `spec` (the train split with `train_spec` when
    given: un-equalised for augmentations that must run before the equaliser); bad files are
    reported in `.errors` and logged."""
    out: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}
    errors: list[dict[str, str]] = []
    for split in ("train", "val", "test"):
        recs = [r for r in records if r.split == split]
        if not recs:
            continue
        ds = read_split(recs, classes, train_spec if split == "train" and train_spec else spec, store)
        bad = ds.filter(lambda row: row["error"] != "").select_columns(["path", "error", "error_kind"]).take_all()
        errors += [{"path": str(b["path"]), "split": split, "kind": str(b["error_kind"]), "error": str(b["error"])}
                   for b in bad]
        if bad:
            ds = ds.filter(lambda row: row["error"] == "").materialize()
        bad_paths = {str(b["path"]) for b in bad}
        counts[split] = {c: sum(1 for r in recs if r.label == c and r.path not in bad_paths) for c in classes}
        out[split] = ds.drop_columns(["error", "error_kind"])
    if errors:  # counts by kind only: file names carry patient ids (they are in Ingest.errors)
        log.warning("%d file(s) could not be read or decoded and are left out: %s", len(errors),
                    ", ".join(f"{k} {n}" for k, n in sorted(Counter(e["kind"] for e in errors).items())))
    return Ingest(out, counts, errors)


def oversample(ds: Any, counts: dict[str, int], classes: list[str]) -> Any:
    """Repeat minority-class rows so every class has about as many rows as the largest one."""
    biggest = max(counts.values()) if counts else 0
    parts = []
    for c, n in counts.items():
        extra = round(biggest / n) - 1 if n else 0
        if extra > 0:
            idx = classes.index(c)
            minority = ds.filter(lambda row, idx=idx: row["label"] == idx)
            parts += [minority] * extra
    return ds.union(*parts) if parts else ds


def to_numpy(ds: Any) -> dict[str, np.ndarray]:
    """A (small) dataset pulled to the driver: {image: uint8[N, S, S], label: int[N], path: str[N]}."""
    chunks: dict[str, list[np.ndarray]] = {"image": [], "label": [], "path": []}
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for k in chunks:
            chunks[k].append(batch[k])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}
