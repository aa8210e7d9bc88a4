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
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pneumo.adaptation import ADAPT_METHODS, adapt_bundle, adjust_prevalence, run_drift
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
from pneumo.runs import (
    RUNS_DIR,
    SUCCESS_FILE,
    BadRun,
    _list_parts,
    _part_names,
    _read_parts,
    already_scored,
    unchanged_files,
)
from pneumo.score_tasks import EXPLAIN_DIR, _ensure_ray, score_dataset


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
    batch_size: int = field(default=64, metadata={"help": "images per model call"})
    read_batch_size: int = field(default=64, metadata={"help": "files per read+preprocess task batch"})
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
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage: where the wall time went


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


# ---------------------------------------------------------------- the run


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- drift and --adapt (driver side)


def run_score(cfg: ScoreConfig) -> ScoreResult:
    """Score `cfg`'s input into `<out>/runs/<run_id>/`, verify one row per file, commit."""

    from pneumo.bundle import read_manifest as read_bundle_manifest

    cfg.validate()
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    mark = [t0]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - mark[0], 3)
        mark[0] = now
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
    stage("list")

    files: list[str] = []
    scoring_bundle, engine, adabn = cfg.bundle, cfg.engine, None
    if "adabn" in cfg.adaptations and records:
        scoring_bundle, adabn = adapt_bundle(cfg, bundle, records, run_dir)
        engine = "torch"
    if records:
        _ensure_ray()
        items = [{"path": r.path, "size_bytes": int(r.size), "mtime_ns": int(r.mtime_ns)} for r in records]
        ds = score_dataset(items, bundle.input, scoring_bundle, cfg, run_id, engine,
                           join(run_dir, EXPLAIN_DIR) if cfg.explain else None)
        fs, inner = resolve_filesystem(run_dir, cfg.s3_endpoint)
        ds.write_parquet(inner, filesystem=fs, filename_provider=_part_names())
        files = _list_parts(run_dir, cfg.s3_endpoint)
    stage("read_score_write")

    # Verify before committing: exactly one row per input file.
    table = _read_parts(cfg.out, run_id, files, cfg.s3_endpoint)
    paths = table.column("path").to_pylist()
    expected = {r.path for r in records}
    if len(paths) != len(records) or set(paths) != expected:
        missing, extra = expected - set(paths), len(paths) - len(set(paths))
        raise RuntimeError(f"run {run_id}: {len(paths)} rows for {len(records)} files "
                           f"({len(missing)} missing, {extra} duplicated); not committing")
    stage("verify")
    drift = run_drift(cfg, bundle, run_dir, table)
    stage("drift")
    adaptation = None
    if cfg.adapt:
        table, adaptation = adjust_prevalence(cfg, bundle, run_id, files, table, adabn)
    status = Counter(table.column("status").to_pylist())
    labels = Counter(v for v in table.column("label").to_pylist() if v is not None)
    errors = Counter(v for v in table.column("error_kind").to_pylist() if v is not None)
    if cfg.adapt:
        stage("adapt_em")
    wall = time.perf_counter() - t0
    result = ScoreResult(
        run_id=run_id, run_dir=run_dir, n_listed=n_listed, n_skipped=n_skipped, n_scored=len(records),
        counts={"ok": status.get("ok", 0), "error": status.get("error", 0)},
        labels=dict(sorted(labels.items())), errors=dict(sorted(errors.items())),
        wall_s=round(wall, 3), images_per_s=round(len(records) / wall, 2) if wall > 0 else 0.0, files=files,
        drift=drift, adaptation=adaptation, ignored_runs=[asdict(b) for b in ignored], stages=stages,
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
    lines.append(f"  wall {r.wall_s:.1f} s, {r.images_per_s:.1f} images/s ("
                 + ", ".join(f"{k} {v:.1f} s" for k, v in r.stages.items()) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`pneumo score`: parse flags, run, print the summary."""
    cfg = parse_config(ScoreConfig, argv, prog="pneumo score")
    result = run_score(cfg)
    print(format_summary(result), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
