"""Batch scoring on Ray Data: an archive of X-rays -> Parquet, one row per input file per run.

    pneumo score DATA --bundle BUNDLE --out OUT [--incremental] [--explain] [--precision auto|fp32|bf16] [--adapt]
    pneumo score --manifest LIST.txt --bundle BUNDLE --out s3://bucket/scores --s3-endpoint http://host:port

The pipeline (shaped like the Ray Data batch-inference docs):

1. the driver lists the input (`pneumo.data.listing.list_images`: every entry, whatever its name, or
   `read_path_list`) into records (path, size, mtime) and, with `--incremental`, drops those
   whose *content* the same bundle scored in earlier *committed* runs: (path, size, mtime) is a
   pre-filter, and a file whose key matches a committed row is read and sha256-hashed by Ray Data
   tasks (`unchanged_files`) and dropped only if the hash is the row's `etag_or_sha256` (a
   same-size replacement may keep its old mtime: `cp -p`, rsync, a DICOM re-export);
2. `ray.data.from_items(records)` then `map_batches(read_and_preprocess)` as Ray Data tasks:
   `pneumo.io.reading.read_image` reads the bytes, sha256s them and preprocesses them to
   uint8[S, S] (the same read path as training ingest and evaluation). A file that
   cannot be read or decoded becomes an error row (status=error, message, kind); no exception
   leaves a batch and no row is dropped. (`from_items` + a reading task, not
   `read_binary_files`, so an unreadable or missing file still has its one row.)
3. `map_batches(BundlePredictor, compute=ActorPoolStrategy(min_size, max_size))`: each actor loads
   the bundle once (`pneumo.bundle.predict.Predictor`) and scores ok rows in `__call__`; error rows
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
   reference (`pneumo.score.drift.run_drift`: `drift.json` + `drift.png` in the run folder) and
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
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pneumo.bundle.manifest import Manifest, drift_reference, read_manifest
from pneumo.config import ConfigError, parse_config, to_dict
from pneumo.data.listing import ImageRecord, list_images, read_path_list
from pneumo.io.storage import Location
from pneumo.ray_env import ensure_ray
from pneumo.score.adaptation import adapt_bundle, adjust_prevalence
from pneumo.score.config import ScoreConfig, ScoreResult
from pneumo.score.drift import run_drift
from pneumo.score.runs import (
    RUNS_DIR,
    SUCCESS_FILE,
    BadRun,
    already_scored,
    list_parts,
    part_names,
    read_parts,
    unchanged_files,
)
from pneumo.score.tasks import EXPLAIN_DIR, score_dataset

__all__ = ["ScoreConfig", "ScoreResult", "run_score", "format_summary", "main"]


def new_run_id() -> str:
    """Sortable and unique: `20261123T161000Z-1a2b3c`."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def list_inputs(cfg: ScoreConfig) -> tuple[Location, list[ImageRecord]]:
    """(the store the paths are read from, the records to score): the listed folder/prefix, or
    the path list's entries (size/mtime looked up; one row per distinct path)."""
    if cfg.data is not None:
        store = cfg.data_location
        return store, list_images(store)  # every entry: unsupported ones are error rows
    store = cfg.manifest_location
    out: list[ImageRecord] = []
    for path in dict.fromkeys(read_path_list(store)):  # de-duplicate, keep order: one row per file
        try:
            loc = store.at(path)
            info = loc.info()
            if info.type == pafs.FileType.File:
                out.append(ImageRecord(loc.uri, size=info.size or 0, mtime_ns=info.mtime_ns or -1))
            else:
                out.append(ImageRecord(loc.uri))  # scored as a `missing` error row
        except Exception:  # noqa: BLE001 - a bad list line is a row, not a crash
            out.append(ImageRecord(path))
    return store, out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class _Stages:
    """Seconds per stage of a run: where the wall time went."""

    def __init__(self) -> None:
        self.t0 = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 3)
        self.mark = now


def _verify(run_id: str, table: pa.Table, records: list[ImageRecord]) -> None:
    """Exactly one row per input file, or no commit."""
    paths = table.column("path").to_pylist()
    expected = {r.path for r in records}
    if len(paths) != len(records) or set(paths) != expected:
        missing, extra = expected - set(paths), len(paths) - len(set(paths))
        raise RuntimeError(f"run {run_id}: {len(paths)} rows for {len(records)} files "
                           f"({len(missing)} missing, {extra} duplicated); not committing")


def _score(cfg: ScoreConfig, bundle: Location, manifest: Manifest, store: Location, records: list[ImageRecord],
           run_id: str, run_dir: Location) -> tuple[list[str], dict[str, Any] | None]:
    """Score `records` into Parquet parts under `run_dir` (AdaBN first with --adapt); (parts, AdaBN info)."""
    scoring_bundle, engine, adabn = bundle, cfg.engine, None
    if "adabn" in cfg.adaptations and records:
        scoring_bundle, adabn = adapt_bundle(cfg, bundle, manifest, store, records, run_dir)
        engine = "torch"
    if not records:
        return [], adabn
    ensure_ray()
    items = [{"path": r.path, "size_bytes": int(r.size), "mtime_ns": int(r.mtime_ns)} for r in records]
    ds = score_dataset(items, store, manifest.input, scoring_bundle, cfg.pipeline(), run_id, engine,
                       run_dir.join(EXPLAIN_DIR) if cfg.explain else None)
    ds.write_parquet(run_dir.path, filesystem=run_dir.fs, filename_provider=part_names())
    return list_parts(run_dir), adabn


def run_score(cfg: ScoreConfig) -> ScoreResult:
    """Score `cfg`'s input into `<out>/runs/<run_id>/`, verify one row per file, commit."""
    cfg.validate()
    stages = _Stages()
    started = _now()
    run_id = cfg.run_id or new_run_id()
    bundle, out = cfg.bundle_location, cfg.out_location
    run_dir = out.join(RUNS_DIR, run_id)
    manifest = read_manifest(bundle)
    if list_parts(run_dir):
        raise ConfigError(f"{run_dir} already holds parts; pick a new --run-id")

    store, records = list_inputs(cfg)
    n_listed = len(records)
    ignored: list[BadRun] = []
    if cfg.incremental:
        done = already_scored(out, manifest.sha256, bad=ignored)
        unchanged = unchanged_files(cfg.pipeline(), store, records, done)
        records = [r for r in records if r.path not in unchanged]
    stages.done("list")

    files, adabn = _score(cfg, bundle, manifest, store, records, run_id, run_dir)
    stages.done("read_score_write")
    table = read_parts(run_dir, files)
    _verify(run_id, table, records)
    stages.done("verify")
    drift = run_drift(drift_reference(bundle, manifest), run_dir, table)
    stages.done("drift")
    adaptation = None
    if cfg.adapt:
        table, adaptation = adjust_prevalence(cfg, manifest, run_dir, files, table, adabn)
        stages.done("adapt_em")
    status = Counter(table.column("status").to_pylist())
    labels = Counter(v for v in table.column("label").to_pylist() if v is not None)
    errors = Counter(v for v in table.column("error_kind").to_pylist() if v is not None)
    wall = time.perf_counter() - stages.t0
    result = ScoreResult(
        run_id=run_id, run_dir=run_dir.uri, n_listed=n_listed, n_skipped=n_listed - len(records),
        n_scored=len(records), counts={"ok": status.get("ok", 0), "error": status.get("error", 0)},
        labels=dict(sorted(labels.items())), errors=dict(sorted(errors.items())),
        wall_s=round(wall, 3), images_per_s=round(len(records) / wall, 2) if wall > 0 else 0.0, files=files,
        drift=drift, adaptation=adaptation, ignored_runs=[asdict(b) for b in ignored], stages=stages.seconds,
    )
    marker = {
        **asdict(result), "finished_at": _now(), "started_at": started,
        "bundle": cfg.bundle, "bundle_sha256": manifest.sha256, "model_uri": bundle.source, "model": manifest.model,
        "model_version": manifest.version, "classes": manifest.classes, "threshold": manifest.threshold_value,
        "config": to_dict(cfg),
    }
    run_dir.join(SUCCESS_FILE).write_bytes(json.dumps(marker, indent=2, default=str).encode())
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
