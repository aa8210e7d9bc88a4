"""Batch scoring on Ray Data: an archive of X-rays -> Parquet, one row per input file per run.

    pneumo score DATA --bundle BUNDLE --out OUT [--incremental] [--explain] [--precision auto|fp32|bf16] [--adapt]
    pneumo score --manifest LIST.txt --bundle BUNDLE --out s3://bucket/scores --s3-endpoint http://host:port

The pipeline (shaped like the Ray Data batch-inference docs):

1. the driver lists the input (`pneumo.data.list_images`: every entry, whatever its name, or
   `read_manifest`) into records (path, size, mtime) and, with `--incremental`, drops those
   whose *content* the same bundle scored in earlier *committed* runs: (path, size, mtime) is a
   pre-filter, and a file whose key matches a committed row is read and sha256-hashed by Ray Data
   tasks (`unchanged_files`) and dropped only if the hash is the row's `etag_or_sha256` (a
   same-size replacement may keep its old mtime: `cp -p`, rsync, a DICOM re-export);
2. `ray.data.from_items(records)` then `map_batches(read_and_preprocess)` as Ray Data tasks:
   `pneumo.reading.read_image` reads the bytes, sha256s them and preprocesses them to
   uint8[S, S] (the same read path as training ingest and evaluation). A file that
   cannot be read or decoded becomes an error row (status=error, message, kind); no exception
   leaves a batch and no row is dropped. (`from_items` + a reading task, not
   `read_binary_files`, so an unreadable or missing file still has its one row.)
3. `map_batches(BundlePredictor, compute=ActorPoolStrategy(min_size, max_size))`: each actor loads
   the bundle once (`pneumo.predict.Predictor`) and scores ok rows in `__call__`; error rows
   pass through with no probability. With `--explain`, Grad-CAM overlays for positives.
   `__call__` never raises: a batch the model fails on is retried image by image and each image
   that still fails is a `model` error row; an overlay that cannot be written makes its row an
   `explain` error row (both kinds are retried by `--incremental`).
4. `write_parquet` to `<out>/runs/<run_id>/part-*.parquet`; the driver reads the parts back,
   checks exactly one row per input file, then writes `<out>/runs/<run_id>/_SUCCESS.json`
   last. Readers (`read_results`, `--incremental`) trust only runs with that marker, so a run
   killed halfway is ignored and its files are scored again next time. A marker that does not
   parse, or whose parts are missing or unreadable, makes the run *damaged*: readers skip it
   with a warning (`committed_runs(..., bad=[])` lists them), never raise, and `--incremental`
   scores its files again.
5. Drift, before the commit: each ok row carries its embedding projected on the bundle's drift
   reference (`embedding`, up to 32 floats); the driver compares all ok rows of the run with the
   reference (`pneumo.drift.write_run_drift`: `drift.json` + `drift.png` in the run folder) and
   puts the verdict in the marker, the `ScoreResult` and the summary's `drift:` line.

`--adapt` (opt-in, never the default), without labels:
- AdaBN first, in the driver: BatchNorm statistics re-estimated on a sample of the archive
  (`--adapt-sample`, 512) with the torch model, saved as a torch-only bundle in
  `<run_dir>/adapted_bundle/` that the actors then score with the torch engine (ONNX graphs have
  BatchNorm folded into the convolutions, so ONNX Runtime cannot adapt);
- EM afterwards, as a driver post-pass before the commit: the archive's class priors estimated
  from the run's probabilities (Saerens et al. 2002, `estimate_prevalence_em`) against the
  training prior (the bundle's training class counts), probabilities re-weighted, labels
  re-decided at the bundle's threshold, parts rewritten. Every row then says `adapted` and
  `prevalence_estimate`. Drift is judged on the scores before EM.
`--adapt-methods` (default `adabn,em`) picks either or both: AdaBN assumes the class mix did not
change (re-estimated on mostly-normal images it pulls every score down and EM then overshoots),
so a prevalence-only change wants `em` alone.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pneumo.config import ConfigError, parse_config, to_dict
from pneumo.data import (
    ImageRecord,
    join,
    list_images,
    read_manifest,
    resolve_filesystem,
    to_location,
    write_bytes,
)
from pneumo.precision import PRECISIONS
from pneumo.preprocess import InputSpec, to_tensor
from pneumo.reading import IO_KINDS, read_bytes_of, read_image

SUCCESS_FILE = "_SUCCESS.json"
RUNS_DIR = "runs"
EXPLAIN_DIR = "explain"
# Error kinds: `pneumo.reading.KINDS` for reading, plus `model` (the model failed on the image)
# and `explain` (its Grad-CAM overlay could not be written) from the actors. I/O kinds, `model`
# and `explain` are retried by --incremental (`read` is the name runs before the one read path
# gave to `unreadable`; their rows are retried too).
SCORING_KINDS = ("model", "explain")
RETRY_KINDS = (*IO_KINDS, "read", *SCORING_KINDS)
log = logging.getLogger(__name__)
ADAPT_METHODS = ("adabn", "em")  # --adapt-methods, in the order they run

OUTPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("etag_or_sha256", pa.string()),
        ("mtime_ns", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("label", pa.string()),
        ("probability", pa.float64()),
        ("probabilities", pa.list_(pa.float64())),
        ("threshold", pa.float64()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("bundle_sha256", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("explain_path", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("adapted", pa.string()),
        ("prevalence_estimate", pa.float64()),
    ]
)


@dataclass
class ScoreConfig:
    """Batch-score an archive of chest X-rays into Parquet with Ray Data."""

    data: str | None = field(default=None, metadata={
        "positional": True, "help": "folder or s3:// prefix to score (any nesting); or use --manifest"})
    bundle: str = field(default="", metadata={"help": "model bundle folder or s3:// prefix (required)"})
    out: str = field(default="", metadata={"help": "output folder or s3:// prefix (required)"})
    manifest: str | None = field(default=None, metadata={"help": "text file listing paths to score, one per line"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    incremental: bool = field(default=False, metadata={
        "help": "skip files already scored by the same bundle in earlier committed runs"})
    explain: bool = field(default=False, metadata={"help": "write Grad-CAM overlay PNGs for positive predictions"})
    engine: str = field(default="auto", metadata={
        "choices": ["auto", "torch", "onnxruntime"],
        "help": "auto = ONNX Runtime on CPU when the bundle has model.onnx, torch on GPU"})
    precision: str = field(default="auto", metadata={
        "choices": list(PRECISIONS), "help": "auto = fp32 on ONNX Runtime, bf16 on torch only where native; "
                                             "int8 needs a gated model.int8.onnx"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory layout (torch engine)"})
    batch_size: int = field(default=32, metadata={"help": "images per model call"})
    read_batch_size: int = field(default=16, metadata={"help": "files per read+preprocess task batch"})
    read_cpus: float = field(default=0.25, metadata={
        "help": "CPUs per read+preprocess task (decoding is cheap next to the model)"})
    min_actors: int = field(default=1, metadata={"help": "actor pool minimum size"})
    max_actors: int = field(default=0, metadata={"help": "actor pool maximum size (0: one per node with CPUs)"})
    cpus_per_actor: float = field(default=0.0, metadata={
        "help": "CPUs per model actor (0: a node's CPUs less one read task's)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per model actor (0 = CPU)"})
    threads: int = field(default=0, metadata={
        "help": "engine threads per actor (0: the CPUs of the node the pool is sized for)"})
    run_id: str | None = field(default=None, metadata={"help": "run id (default: UTC time + random suffix)"})
    adapt: bool = field(default=False, metadata={
        "help": "adapt to this archive without labels: AdaBN (torch engine) + EM prevalence re-weighting"})
    adapt_methods: str = field(default="adabn,em", metadata={
        "help": "with --adapt: adabn (image appearance), em (prevalence) or both; AdaBN assumes the class mix "
                "did not change"})
    adapt_sample: int = field(default=512, metadata={"help": "images AdaBN re-estimates BatchNorm statistics on"})

    @property
    def adaptations(self) -> tuple[str, ...]:
        """The --adapt methods asked for, in the order they run; () without --adapt."""
        asked = {m.strip() for m in self.adapt_methods.split(",") if m.strip()}
        return tuple(m for m in ADAPT_METHODS if m in asked) if self.adapt else ()

    def validate(self) -> None:
        if not self.bundle:
            raise ConfigError("bundle: required (--bundle PATH)")
        if not self.out:
            raise ConfigError("out: required (--out FOLDER or s3://bucket/prefix)")
        if (self.data is None) == (self.manifest is None):
            raise ConfigError("give exactly one input: DATA (folder or s3:// prefix) or --manifest FILE")
        if self.batch_size < 1 or self.read_batch_size < 1:
            raise ConfigError("batch_size and read_batch_size must be >= 1")
        if self.min_actors < 1 or (self.max_actors and self.min_actors > self.max_actors):
            raise ConfigError(f"need 1 <= min_actors <= max_actors (0: auto), got {self.min_actors}, {self.max_actors}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = the actor's CPUs), got {self.threads}")
        if self.cpus_per_actor < 0 or self.read_cpus <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("cpus_per_actor >= 0 (0: auto), read_cpus > 0, gpus_per_actor >= 0")
        asked = {m.strip() for m in self.adapt_methods.split(",") if m.strip()}
        if not asked or asked - set(ADAPT_METHODS):
            raise ConfigError(f"adapt_methods: a comma list of {', '.join(ADAPT_METHODS)}, got {self.adapt_methods!r}")
        if "adabn" in self.adaptations and (self.engine == "onnxruntime" or self.precision == "int8"):
            raise ConfigError("--adapt re-estimates BatchNorm statistics, which needs the torch engine "
                              "(ONNX graphs have BatchNorm folded): use --engine auto or torch, not int8")
        if self.adapt_sample < 2:
            raise ConfigError(f"adapt_sample must be >= 2, got {self.adapt_sample}")


@dataclass
class ScoreResult:
    """What one run did (also written, with its config, to the run's `_SUCCESS.json`)."""

    run_id: str
    run_dir: str
    n_listed: int
    n_skipped: int
    n_scored: int
    counts: dict[str, int]
    labels: dict[str, int]
    errors: dict[str, int]
    wall_s: float
    images_per_s: float
    files: list[str] = field(default_factory=list)
    drift: dict[str, Any] = field(default_factory=dict)  # drift.json's verdict (+ its path)
    adaptation: dict[str, Any] | None = None  # --adapt: AdaBN and the EM prevalence estimate
    ignored_runs: list[dict[str, str]] = field(default_factory=list)  # damaged runs --incremental left out


# ---------------------------------------------------------------- input


def new_run_id() -> str:
    """Sortable and unique: `20261123T161000Z-1a2b3c`."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def list_inputs(cfg: ScoreConfig) -> list[ImageRecord]:
    """Records to score: the listed folder/prefix, or the manifest's paths (size/mtime looked up)."""
    if cfg.data is not None:
        return list_images(cfg.data, cfg.s3_endpoint)  # every entry: unsupported ones are error rows
    paths = read_manifest(cfg.manifest, cfg.s3_endpoint)
    out: list[ImageRecord] = []
    for path in dict.fromkeys(paths):  # de-duplicate, keep order: one row per file
        try:
            fs, inner = resolve_filesystem(path, cfg.s3_endpoint)
            info = fs.get_file_info(inner)
            loc = to_location(fs, inner)
            if info.type == pafs.FileType.File:
                out.append(ImageRecord(loc, size=info.size or 0, mtime_ns=info.mtime_ns or -1))
            else:
                out.append(ImageRecord(loc))  # scored as a `missing` error row
        except Exception:  # noqa: BLE001 - a bad manifest line is a row, not a crash
            out.append(ImageRecord(path))
    return out


# ---------------------------------------------------------------- read + preprocess (Ray Data tasks)


def read_and_preprocess(batch: dict[str, np.ndarray], spec: InputSpec, s3_endpoint: str | None) -> dict[str, np.ndarray]:
    """Ray Data task: read bytes, hash, decode+resize (`pneumo.reading.read_image`). Every input
    row gives one output row."""
    n = len(batch["path"])
    images = np.zeros((n, spec.size, spec.size), dtype=np.uint8)
    sha = np.full(n, None, dtype=object)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, None, dtype=object)
    kind = np.full(n, None, dtype=object)
    for i, path in enumerate(batch["path"]):
        res = read_image(str(path), spec, s3_endpoint)
        sha[i] = res.sha256
        if res.error is None:
            images[i] = res.image
        else:
            status[i], kind[i], error[i] = "error", res.error.kind, res.error.message
    return {
        "path": np.asarray(batch["path"], dtype=object),
        "size_bytes": np.asarray(batch["size_bytes"], dtype=np.int64),
        "mtime_ns": np.asarray(batch["mtime_ns"], dtype=np.int64),
        "etag_or_sha256": sha,
        "status": status,
        "error": error,
        "error_kind": kind,
        "image": images,
    }


# ---------------------------------------------------------------- model (Ray Data actor pool)


def explain_name(path: str) -> str:
    """Overlay file name for an input path: `<stem>-<8 hex of the path>.png` (unique per path).
    The stem is cut to 100 bytes so the name (and `write_bytes`' temporary name) stays far under
    the 255-byte file-name limit, however long the input's name."""
    stem = PurePosixPath(path).stem.encode()[:100].decode(errors="ignore")
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}.png"


def _strings(values: np.ndarray) -> list[str | None]:
    """A string column back from Ray's numpy batches: an all-null column arrives as NaN floats."""
    return [v if isinstance(v, str) else None for v in values]


class BundlePredictor:
    """Ray Data actor: loads the bundle once in `__init__`, scores batches in `__call__`."""

    def __init__(
        self,
        bundle: str,
        run_id: str,
        s3_endpoint: str | None = None,
        engine: str = "auto",
        precision: str = "auto",
        channels_last: bool = True,
        explain_dir: str | None = None,
        threads: int = 0,
    ):
        from pneumo.predict import Predictor

        self.predictor = Predictor(bundle, s3_endpoint=s3_endpoint, engine=engine, precision=precision,
                                   channels_last=channels_last, threads=threads)
        self.s3_endpoint = s3_endpoint
        self.run_id = run_id
        self.explain_dir = explain_dir
        self.reference = self.predictor.drift_reference()  # None: no `embedding` column values
        m = self.predictor.manifest
        self.meta = {"threshold": m.threshold_value, "model": m.model, "model_version": m.version,
                     "bundle_sha256": m.sha256, "engine": self.predictor.engine,
                     "precision": self.predictor.precision}

    def _explain(self, path: str, image: np.ndarray) -> str:
        from pneumo.gradcam import gradcam, overlay_png

        p = self.predictor
        heat = gradcam(p.explain_model, to_tensor(image[None], p.spec), p.manifest.negative_index)
        loc = join(self.explain_dir, explain_name(path))
        write_bytes(loc, overlay_png(image, heat), self.s3_endpoint)
        return loc

    def _predict_batch(self, images: np.ndarray) -> list[tuple[Any, ...]]:
        """(probabilities, positive score, label, projected embedding or None) per image."""
        p, features = self.predictor.predict_with_features(images)
        z = self.reference.project(features) if self.reference is not None else [None] * len(images)
        pos, labels = self.predictor.positive_probability(p), self.predictor.labels(p)
        return [(p[j], pos[j], labels[j], z[j]) for j in range(len(images))]

    def _predict(self, images: np.ndarray) -> list[tuple[Any, ...] | Exception]:
        """`_predict_batch` on the whole batch; if that raises, image by image, so one image the
        model fails on costs only its own row (an exception in its place)."""
        try:
            return self._predict_batch(images)
        except Exception:  # noqa: BLE001 - retried image by image below
            if len(images) == 1:
                raise
        out: list[tuple[Any, ...] | Exception] = []
        for j in range(len(images)):
            try:
                out.extend(self._predict_batch(images[j: j + 1]))
            except Exception as exc:  # noqa: BLE001 - this image's `model` error row
                out.append(exc)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Score a batch; never raises: a failure becomes `model` / `explain` error rows."""
        n = len(batch["path"])
        cols: dict[str, list[Any]] = {
            "status": _strings(batch["status"]), "error": _strings(batch["error"]),
            "error_kind": _strings(batch["error_kind"]), "label": [None] * n, "probability": [None] * n,
            "probabilities": [None] * n, "explain_path": [None] * n, "embedding": [None] * n,
        }
        ok = [i for i in range(n) if cols["status"][i] == "ok"]
        try:
            self._score(batch, ok, cols)
        except Exception as exc:  # noqa: BLE001 - anything else: the batch's ok rows become `model` errors
            for i in ok:
                _fail(cols, i, "model", f"model failed on the batch ({_reason(exc)})")
        return self._table(batch, cols)

    def _score(self, batch: dict[str, np.ndarray], ok: list[int], cols: dict[str, list[Any]]) -> None:
        if not ok:
            return
        images = np.asarray(batch["image"])[ok]
        negative = self.predictor.classes[self.predictor.manifest.negative_index]
        for j, (i, res) in enumerate(zip(ok, self._predict(images))):
            if isinstance(res, Exception):
                _fail(cols, i, "model", f"model failed on this image ({_reason(res)})")
                continue
            p, pos, label, z = res
            cols["label"][i], cols["probability"][i] = label, float(pos)
            cols["probabilities"][i], cols["embedding"][i] = [float(v) for v in p], z
            if self.explain_dir and label != negative:
                try:
                    cols["explain_path"][i] = self._explain(str(batch["path"][i]), images[j])
                except Exception as exc:  # noqa: BLE001 - e.g. the explain folder cannot be written
                    _fail(cols, i, "explain", f"Grad-CAM overlay not written ({_reason(exc)})")

    def _table(self, batch: dict[str, np.ndarray], cols: dict[str, list[Any]]) -> pa.Table:
        n = len(batch["path"])
        now = _dt.datetime.now(_dt.UTC)
        cols = {
            **cols,
            "path": [str(v) for v in batch["path"]],
            "size_bytes": np.asarray(batch["size_bytes"], dtype=np.int64),
            "etag_or_sha256": _strings(batch["etag_or_sha256"]),
            "mtime_ns": np.asarray(batch["mtime_ns"], dtype=np.int64),
            "threshold": [self.meta["threshold"]] * n,
            "model": [self.meta["model"]] * n,
            "model_version": [self.meta["model_version"]] * n,
            "bundle_sha256": [self.meta["bundle_sha256"]] * n,
            "scored_at": [now] * n,
            "run_id": [self.run_id] * n,
            "engine": [self.meta["engine"]] * n,
            "precision": [self.meta["precision"]] * n,
            "adapted": [None] * n,  # set by the --adapt post-pass
            "prevalence_estimate": [None] * n,
        }
        return pa.table({name: pa.array(cols[name], type=OUTPUT_SCHEMA.field(name).type) for name in OUTPUT_SCHEMA.names},
                        schema=OUTPUT_SCHEMA)


def _reason(exc: BaseException) -> str:
    """An exception as error-row text without a path: an OSError's message names the file (and
    file names carry patient ids), so only its type and strerror are kept."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}"[:300]


def _fail(cols: dict[str, list[Any]], i: int, kind: str, message: str) -> None:
    """Row `i` becomes an error row of `kind` (`model` or `explain`): no prediction, no overlay."""
    for name in ("label", "probability", "probabilities", "explain_path", "embedding"):
        cols[name][i] = None
    cols["status"][i], cols["error_kind"][i], cols["error"][i] = "error", kind, message


# ---------------------------------------------------------------- committed runs


def _part_names():  # noqa: ANN202 - a Ray FilenameProvider, imported lazily
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}-{write_uuid}.parquet"

    return PartNames(file_format="parquet")


@dataclass(frozen=True)
class BadRun:
    """A run folder with a `_SUCCESS.json` that readers cannot trust, and why (no input names)."""

    run_id: str
    reason: str


def _ignore(bad: list[BadRun] | None, run_id: str, exc: BaseException) -> None:
    """Report a damaged run: one warning line (run id and reason) and an entry in `bad`."""
    entry = BadRun(run_id, f"{type(exc).__name__}: {exc}"[:300])
    log.warning("ignoring run %s: %s (its files are scored again by --incremental)", entry.run_id, entry.reason)
    if bad is not None:
        bad.append(entry)


def _check_marker(fs: pafs.FileSystem, run_path: str, run_id: str) -> dict[str, Any]:
    """The run's marker, if it parses and every part it lists is there with a readable Parquet
    footer, the parts' rows adding up to the marker's `n_scored`; raises otherwise."""
    with fs.open_input_stream(f"{run_path}/{SUCCESS_FILE}") as f:
        marker = json.loads(f.read())
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list) \
            or not isinstance(marker.get("finished_at"), str):
        raise ValueError("marker is not a run record (files, finished_at)")
    if marker.get("run_id") != run_id:
        raise ValueError(f"marker names run {marker.get('run_id')!r}, not its folder")
    rows = 0
    for name in marker["files"]:
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad part name {name!r}")
        rows += pq.read_metadata(f"{run_path}/{name}", filesystem=fs).num_rows
    if isinstance(marker.get("n_scored"), int) and rows != marker["n_scored"]:
        raise ValueError(f"parts hold {rows} rows, the marker says {marker['n_scored']}")
    return marker


def committed_runs(out: str, s3_endpoint: str | None = None, *, bad: list[BadRun] | None = None) -> list[dict[str, Any]]:
    """The `_SUCCESS.json` markers of every committed run under `<out>/runs/`, oldest first.

    A run folder without a marker is not committed (killed or still running) and is left out
    silently. A marker that does not parse, or whose listed parts are missing or have no
    readable Parquet footer, is left out with a warning and appended to `bad`: readers never
    raise on a damaged run, and `--incremental` scores its files again."""
    fs, root = resolve_filesystem(join(out, RUNS_DIR), s3_endpoint)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        return []
    markers = []
    for fi in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if fi.type != pafs.FileType.Directory:
            continue
        if fs.get_file_info(fi.path + "/" + SUCCESS_FILE).type != pafs.FileType.File:
            continue  # not committed: killed or still running
        try:
            markers.append(_check_marker(fs, fi.path, fi.base_name))
        except Exception as exc:  # noqa: BLE001 - torn marker, missing or torn part, S3 trouble
            _ignore(bad, fi.base_name, exc)
    return sorted(markers, key=lambda m: (m["finished_at"], m["run_id"]))


def _read_parts(out: str, run_id: str, files: list[str], s3_endpoint: str | None) -> pa.Table:
    fs, run_dir = resolve_filesystem(join(out, RUNS_DIR, run_id), s3_endpoint)
    tables = [pq.read_table(f"{run_dir}/{name}", filesystem=fs, schema=OUTPUT_SCHEMA) for name in files]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def read_committed(out: str, s3_endpoint: str | None = None, *, bad: list[BadRun] | None = None) -> pa.Table:
    """Every row of every committed run, oldest run first (a path may appear once per run). A run
    whose parts cannot be read is left out whole, like a damaged marker (see `committed_runs`)."""
    tables = []
    for m in committed_runs(out, s3_endpoint, bad=bad):
        try:
            tables.append(_read_parts(out, m["run_id"], m["files"], s3_endpoint))
        except Exception as exc:  # noqa: BLE001 - a part torn past its footer
            _ignore(bad, m["run_id"], exc)
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def read_results(out: str, s3_endpoint: str | None = None):  # noqa: ANN201 - pandas.DataFrame
    """Committed results as a pandas DataFrame: the latest row per path (by scored_at, then run_id)."""
    df = read_committed(out, s3_endpoint).to_pandas()
    if df.empty:
        return df
    df = df.sort_values(["scored_at", "run_id"], kind="stable")
    return df.drop_duplicates("path", keep="last").sort_values("path").reset_index(drop=True)


def already_scored(out: str, bundle_sha256: str, s3_endpoint: str | None = None, *,
                   bad: list[BadRun] | None = None) -> dict[tuple[str, int, int], str | None]:
    """(path, size, mtime_ns) -> sha256 of the bytes (`etag_or_sha256`, None where the file was
    never read) for files that committed runs scored with this bundle, the latest run's row per
    key; rows of retried error kinds (`RETRY_KINDS`) are left out, so those files are scored again."""
    t = read_committed(out, s3_endpoint, bad=bad)
    done: dict[tuple[str, int, int], str | None] = {}
    cols = ["path", "size_bytes", "mtime_ns", "etag_or_sha256", "bundle_sha256", "error_kind"]
    for row in t.select(cols).to_pylist():  # oldest run first: a later row for the same key wins
        key = (row["path"], row["size_bytes"], row["mtime_ns"])
        if row["bundle_sha256"] != bundle_sha256:
            continue
        if row["error_kind"] in RETRY_KINDS:
            done.pop(key, None)
        else:
            done[key] = row["etag_or_sha256"]
    return done


def _same_content(batch: dict[str, np.ndarray], s3_endpoint: str | None) -> dict[str, np.ndarray]:
    """Ray Data task: for each (path, sha256 committed for it), whether the bytes now hash the same
    (False when they cannot be read: the file is scored again and gets its error row)."""
    same = np.zeros(len(batch["path"]), dtype=bool)
    for i, (path, sha) in enumerate(zip(batch["path"], batch["sha256"])):
        try:
            same[i] = hashlib.sha256(read_bytes_of(str(path), s3_endpoint)).hexdigest() == sha
        except Exception:  # noqa: BLE001, S112 - unreadable now: not unchanged
            continue
    return {"path": np.asarray(batch["path"], dtype=object), "same": same}


def unchanged_files(cfg: ScoreConfig, records: list[ImageRecord],
                    done: dict[tuple[str, int, int], str | None]) -> set[str]:
    """`--incremental`: the paths among `records` whose content is what a committed run scored.

    (path, size, mtime) is only a pre-filter: a key no committed row has is scored without
    reading twice. A key that matches is confirmed by content: Ray Data tasks read and sha256 the
    bytes and compare them with the committed row's `etag_or_sha256`, because a same-size
    replacement can keep the old mtime (`cp -p`, rsync, a DICOM re-export). A committed row with
    no hash (a folder entry, never read) is matched by its key alone."""
    import ray

    known = {r.path: done[(r.path, r.size, r.mtime_ns)] for r in records if (r.path, r.size, r.mtime_ns) in done}
    unchanged = {path for path, sha in known.items() if sha is None}
    items = [{"path": path, "sha256": sha} for path, sha in known.items() if sha is not None]
    if items:
        _ensure_ray()
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // cfg.read_batch_size))))
        ds = ds.map_batches(_same_content, fn_kwargs={"s3_endpoint": cfg.s3_endpoint},
                            batch_size=cfg.read_batch_size, batch_format="numpy", num_cpus=cfg.read_cpus)
        unchanged |= {str(row["path"]) for row in ds.take_all() if row["same"]}
    return unchanged


# ---------------------------------------------------------------- the run


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _list_parts(run_dir: str, s3_endpoint: str | None) -> list[str]:
    fs, root = resolve_filesystem(run_dir, s3_endpoint)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(fi.base_name for fi in fs.get_file_info(pafs.FileSelector(root))
                  if fi.type == pafs.FileType.File and fi.base_name.endswith(".parquet"))


def _ensure_ray() -> None:
    import ray

    from pneumo import logs

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (e.g. under `ray job submit`) or an embedded local Ray
    logs.quiet_ray()


@dataclass(frozen=True)
class PoolSize:
    min_actors: int
    max_actors: int
    cpus_per_actor: float
    threads: int


def size_pool(cfg: ScoreConfig) -> PoolSize:
    """The model actor pool from the cluster's resources, unless the config fixes it.

    One actor per node with CPUs (the smallest node sets the size), each holding that node's CPUs
    less one read task's, with as many engine threads as the node has CPUs: on one 2-core machine
    the model gets both cores; on a cluster the pool grows with the nodes.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    node_cpus = min((r["CPU"] for r in nodes), default=1.0)
    if cfg.gpus_per_actor > 0:
        nodes = [r for r in nodes if r.get("GPU", 0) >= cfg.gpus_per_actor] or nodes
    cpus = cfg.cpus_per_actor or max(0.5, node_cpus - cfg.read_cpus)
    max_actors = cfg.max_actors or max(cfg.min_actors, len(nodes))
    threads = cfg.threads or max(1, int(round(node_cpus if not cfg.cpus_per_actor else cfg.cpus_per_actor)))
    return PoolSize(cfg.min_actors, max_actors, cpus, threads)


# ---------------------------------------------------------------- drift and --adapt (driver side)


def load_reference(location: str, manifest: Any, s3_endpoint: str | None = None) -> Any:
    """The bundle's `DriftReference` (sha256-checked), or None when it has none."""
    from pneumo.bundle import read_file
    from pneumo.drift import FILE_NAME, DriftReference

    if FILE_NAME not in manifest.files:
        return None
    return DriftReference.from_bytes(read_file(location, manifest, FILE_NAME, s3_endpoint))


def _ok_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("status"), "ok"))


def run_drift(cfg: ScoreConfig, manifest: Any, run_dir: str, table: pa.Table) -> dict[str, Any]:
    """drift.json (+ drift.png) for the run's ok rows, before the commit; the verdict as a dict."""
    from pneumo.drift import write_no_reference, write_run_drift

    path = join(run_dir, "drift.json")
    reference = load_reference(cfg.bundle, manifest, cfg.s3_endpoint)
    if reference is None:
        return {**write_no_reference(run_dir, cfg.s3_endpoint), "path": path}
    ok = _ok_rows(table)
    scores = np.asarray(ok.column("probability").to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = ok.column("embedding").combine_chunks()
    k = reference.components.shape[0]
    projected = (np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ok), k)
                 if emb.null_count == 0 else None)  # scores only if any row lacks its embedding
    report = write_run_drift(run_dir, reference, projected, scores, s3_endpoint=cfg.s3_endpoint, projected=True)
    return {**report.to_dict(), "path": path, "plot": join(run_dir, "drift.png")}


def adapt_bundle(cfg: ScoreConfig, manifest: Any, records: list[ImageRecord], run_dir: str) -> tuple[str, dict[str, Any]]:
    """AdaBN in the driver: BatchNorm statistics re-estimated on up to `adapt_sample` archive images,
    saved as a torch-only bundle `<run_dir>/adapted_bundle` (drift reference copied) for the actors."""
    import torch

    from pneumo.bundle import INT8_FILE, ONNX_FILE, load_model, read_file, save_bundle
    from pneumo.drift import adapt_batchnorm

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(records), min(cfg.adapt_sample, len(records)), replace=False))
    sample = [records[i] for i in pick]
    pre = read_and_preprocess({"path": np.array([r.path for r in sample], dtype=object),
                               "size_bytes": np.array([r.size for r in sample], dtype=np.int64),
                               "mtime_ns": np.array([r.mtime_ns for r in sample], dtype=np.int64)},
                              manifest.input, cfg.s3_endpoint)
    images = pre["image"][pre["status"] == "ok"]
    if len(images) < 2:
        return cfg.bundle, {"adabn": False, "reason": f"{len(images)} readable image(s) in the sample"}
    device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    model = load_model(cfg.bundle, manifest, cfg.s3_endpoint, device)
    batches = [to_tensor(images[i: i + 32], manifest.input, device=device) for i in range(0, len(images), 32)]
    adapt_batchnorm(model, batches)
    extra = {name: read_file(cfg.bundle, manifest, name, cfg.s3_endpoint)
             for name in manifest.files if name not in (ONNX_FILE, INT8_FILE)}
    location = join(run_dir, "adapted_bundle")
    adapted = save_bundle(model.cpu(), location, manifest.model, manifest.classes, manifest.input,
                          threshold=manifest.threshold, metrics=manifest.metrics, training=manifest.training,
                          model_options=manifest.model_options, version=f"{manifest.version}+adabn",
                          s3_endpoint=cfg.s3_endpoint, onnx=False, extra_files=extra)
    return location, {"adabn": True, "images": int(len(images)), "bundle": location,
                      "bundle_sha256": adapted.sha256}


def training_prior(manifest: Any) -> tuple[np.ndarray, str]:
    """The class prior the model's posteriors assume: uniform after balanced training, else the
    training split's class counts (`manifest.training["counts"]`), else val's."""
    classes = manifest.classes
    balance = (manifest.training.get("config") or {}).get("balance", "none")
    if balance in ("weighted_loss", "oversample"):
        return np.full(len(classes), 1.0 / len(classes)), f"uniform (trained with balance={balance})"
    counts = manifest.training.get("counts") or {}
    for split in ("train", "val"):
        c = np.array([float((counts.get(split) or {}).get(k, 0)) for k in classes])
        if c.sum() > 0 and (c > 0).all():
            return c / c.sum(), f"{split} class counts"
    raise ConfigError("--adapt: the bundle records no training class counts (manifest.training.counts); "
                      "cannot estimate the archive's prevalence against an unknown training prior")


def adjust_prevalence(cfg: ScoreConfig, manifest: Any, run_id: str, files: list[str], table: pa.Table,
                      adabn: dict[str, Any] | None) -> tuple[pa.Table, dict[str, Any]]:
    """EM post-pass before the commit: estimate the archive's class priors from the run's
    probabilities, re-weight every ok row to them, re-decide labels, rewrite the parts."""
    from pneumo.drift import estimate_prevalence_em
    from pneumo.metrics import positive_score
    from pneumo.predict import decide

    em = "em" in cfg.adaptations
    train, source = training_prior(manifest) if em else (np.full(len(manifest.classes), np.nan), "not asked")
    neg = manifest.negative_index
    ok = _ok_rows(table)
    probs = np.array(ok.column("probabilities").to_pylist(), dtype=np.float64).reshape(len(ok), len(train))
    em = em and len(ok) > 0
    prior = estimate_prevalence_em(probs, train)[0] if em else train
    prevalence, train_prevalence = float(1 - prior[neg]), float(1 - train[neg])
    methods = "+".join(["adabn"] * bool(adabn and adabn.get("adabn")) + ["em"] * em)
    run_dir = join(cfg.out, RUNS_DIR, run_id)
    fs, inner = resolve_filesystem(run_dir, cfg.s3_endpoint)
    tables = []
    for name in files:
        part = pq.read_table(f"{inner}/{name}", filesystem=fs, schema=OUTPUT_SCHEMA)
        cols = {c: part.column(c).to_pylist() for c in ("probability", "probabilities", "label")}
        rows = np.flatnonzero(np.array(part.column("status").to_pylist()) == "ok")
        if em and len(rows):
            w = np.array([cols["probabilities"][i] for i in rows], dtype=np.float64) * (prior / train)
            p = w / w.sum(axis=1, keepdims=True)  # Bayes' rule under the estimated prior
            score, label = positive_score(p, manifest.classes), decide(p, manifest.classes, manifest.threshold_value)
            for j, i in enumerate(rows):
                cols["probabilities"][i], cols["probability"][i], cols["label"][i] = p[j].tolist(), float(score[j]), label[j]
        cols["adapted"] = [methods or "none"] * len(part)
        cols["prevalence_estimate"] = [prevalence if em else None] * len(part)
        for c, values in cols.items():
            i = OUTPUT_SCHEMA.get_field_index(c)
            part = part.set_column(i, OUTPUT_SCHEMA.field(c), pa.array(values, type=OUTPUT_SCHEMA.field(c).type))
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        write_bytes(join(run_dir, name), sink.getvalue().to_pybytes(), cfg.s3_endpoint)
        tables.append(part)
    head = (f"adapt: estimated prevalence {prevalence:.2f} (training {train_prevalence:.2f}, {source}); "
            f"probabilities re-weighted ({methods})") if em else f"adapt: {methods or 'nothing to adapt'}"
    tail = (f"; AdaBN on {adabn['images']} images" if adabn and adabn.get("adabn") else
            f"; AdaBN skipped: {adabn['reason']}" if adabn else "")
    line = head + tail
    info = {"methods": methods, "prevalence_estimate": prevalence if em else None,
            "training_prevalence": train_prevalence if em else None, "training_prior": train.tolist() if em else None,
            "prior_source": source, "class_priors": np.asarray(prior).tolist() if em else None,
            "adabn": adabn, "line": line}
    return (pa.concat_tables(tables) if tables else table), info


def run_score(cfg: ScoreConfig) -> ScoreResult:
    """Score `cfg`'s input into `<out>/runs/<run_id>/`, verify one row per file, commit."""
    import ray

    from pneumo.bundle import read_manifest as read_bundle_manifest

    cfg.validate()
    t0 = time.perf_counter()
    started = _now()
    run_id = cfg.run_id or new_run_id()
    run_dir = join(cfg.out, RUNS_DIR, run_id)
    bundle = read_bundle_manifest(cfg.bundle, cfg.s3_endpoint)
    if _list_parts(run_dir, cfg.s3_endpoint):
        raise ConfigError(f"{run_dir} already holds parts; pick a new --run-id")

    records = list_inputs(cfg)
    n_listed = len(records)
    ignored: list[BadRun] = []
    if cfg.incremental:
        unchanged = unchanged_files(cfg, records, already_scored(cfg.out, bundle.sha256, cfg.s3_endpoint, bad=ignored))
        records = [r for r in records if r.path not in unchanged]
    n_skipped = n_listed - len(records)

    files: list[str] = []
    scoring_bundle, engine, adabn = cfg.bundle, cfg.engine, None
    if "adabn" in cfg.adaptations and records:
        scoring_bundle, adabn = adapt_bundle(cfg, bundle, records, run_dir)
        engine = "torch"
    if records:
        _ensure_ray()
        pool = size_pool(cfg)
        items = [{"path": r.path, "size_bytes": int(r.size), "mtime_ns": int(r.mtime_ns)} for r in records]
        n_blocks = max(1, min(len(items), -(-len(items) // cfg.read_batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=n_blocks)
        ds = ds.map_batches(
            read_and_preprocess,
            fn_kwargs={"spec": bundle.input, "s3_endpoint": cfg.s3_endpoint},
            batch_size=cfg.read_batch_size,
            batch_format="numpy",
            num_cpus=cfg.read_cpus,
        )
        ds = ds.map_batches(
            BundlePredictor,
            fn_constructor_kwargs={
                "bundle": scoring_bundle, "run_id": run_id, "s3_endpoint": cfg.s3_endpoint,
                "engine": engine, "precision": cfg.precision, "channels_last": cfg.channels_last,
                "explain_dir": join(run_dir, EXPLAIN_DIR) if cfg.explain else None,
                "threads": pool.threads,
            },
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            num_cpus=pool.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
        )
        fs, inner = resolve_filesystem(run_dir, cfg.s3_endpoint)
        ds.write_parquet(inner, filesystem=fs, filename_provider=_part_names())
        files = _list_parts(run_dir, cfg.s3_endpoint)

    # Verify before committing: exactly one row per input file.
    table = _read_parts(cfg.out, run_id, files, cfg.s3_endpoint)
    paths = table.column("path").to_pylist()
    expected = {r.path for r in records}
    if len(paths) != len(records) or set(paths) != expected:
        missing, extra = expected - set(paths), len(paths) - len(set(paths))
        raise RuntimeError(f"run {run_id}: {len(paths)} rows for {len(records)} files "
                           f"({len(missing)} missing, {extra} duplicated); not committing")
    drift = run_drift(cfg, bundle, run_dir, table)
    adaptation = None
    if cfg.adapt:
        table, adaptation = adjust_prevalence(cfg, bundle, run_id, files, table, adabn)
    status = Counter(table.column("status").to_pylist())
    labels = Counter(v for v in table.column("label").to_pylist() if v is not None)
    errors = Counter(v for v in table.column("error_kind").to_pylist() if v is not None)
    wall = time.perf_counter() - t0
    result = ScoreResult(
        run_id=run_id, run_dir=run_dir, n_listed=n_listed, n_skipped=n_skipped, n_scored=len(records),
        counts={"ok": status.get("ok", 0), "error": status.get("error", 0)},
        labels=dict(sorted(labels.items())), errors=dict(sorted(errors.items())),
        wall_s=round(wall, 3), images_per_s=round(len(records) / wall, 2) if wall > 0 else 0.0, files=files,
        drift=drift, adaptation=adaptation, ignored_runs=[asdict(b) for b in ignored],
    )
    marker = {
        **asdict(result), "finished_at": _now(), "started_at": started,
        "bundle": cfg.bundle, "bundle_sha256": bundle.sha256, "model": bundle.model, "model_version": bundle.version,
        "classes": bundle.classes, "threshold": bundle.threshold_value, "config": to_dict(cfg),
    }
    write_bytes(join(run_dir, SUCCESS_FILE), json.dumps(marker, indent=2, default=str).encode(), cfg.s3_endpoint)
    return result


def format_summary(r: ScoreResult) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in r.labels.items()) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "none"
    lines = [
        f"run {r.run_id}: committed to {r.run_dir}",
        f"  files listed {r.n_listed}, skipped (already scored, same content) {r.n_skipped}, scored {r.n_scored}",
        f"  ok {r.counts['ok']}, errors {r.counts['error']} ({errors})",
        f"  labels: {labels}",
    ]
    if r.ignored_runs:
        ids = ", ".join(b["run_id"] for b in r.ignored_runs)
        lines.append(f"  ignored {len(r.ignored_runs)} damaged run(s) (marker or parts unreadable): {ids}")
    if r.drift:
        lines.append(f"  {r.drift['line']}")
    if r.adaptation:
        lines.append(f"  {r.adaptation['line']}")
    lines.append(f"  wall {r.wall_s:.1f} s, {r.images_per_s:.1f} images/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`pneumo score`: parse flags, run, print the summary."""
    cfg = parse_config(ScoreConfig, argv, prog="pneumo score")
    result = run_score(cfg)
    print(format_summary(result), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
