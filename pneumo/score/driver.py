"""Batch scoring on Ray Data: an archive of X-rays -> a Delta Lake table, one row per input file per run.

    pneumo score DATA --bundle BUNDLE --out OUT [--incremental [--verify-content]] [--explain] [--adapt]
    pneumo score --manifest LIST.txt --bundle BUNDLE --out s3://bucket/scores --s3-endpoint http://host:port

The run (the driver holds counts and file names, never the listing or the rows):

1. before Ray starts: the config, the input's existence, the run id (not a committed run's), and
   with `--adapt` its preconditions (the bundle's training class counts for EM);
2. old Parquet run folders in `--out` become the table's first commit (`pneumo.score.legacy.upgrade`);
3. the input is listed into Ray Data in chunks (`pneumo.score.inputs`); with `--incremental` a
   join against the table's latest rows leaves the files to score (`pneumo.score.incremental`);
4. read tasks then the model actor pool (`pneumo.score.tasks.score_dataset`) write the rows as
   uncommitted Parquet files at the table's root (`pneumo.score.parts.PartSink`);
5. exactly one row per file is checked on those files (Ray Data aggregations); drift is judged on
   the ok rows (`drift.json`, `drift.png` in `<out>/_pneumo/runs/<run_id>/`); `--adapt`'s EM
   re-weights the rows; a drift or plot failure is a warning in the run's record, not a lost run;
6. one Delta commit makes the rows visible with the run's record (counts, bundle, drift verdict,
   warnings, config) in its metadata (`pneumo.score.table.commit`). A run that fails before it
   deletes its files; a killed one's are in no commit, so no reader sees them.

`--adapt` (opt-in, never the default), without labels (`pneumo.score.adaptation`): align and/or
AdaBN first, on a uniform sample of the archive (align: its embedding statistics standardised to
the training ones in the head, exported to ONNX; AdaBN: BatchNorm statistics re-estimated, a
torch-only bundle), saved in the run's side folder for the actors; EM afterwards (the archive's
class priors estimated from the run's probabilities, Saerens et al. 2002, against the training
prior; every row re-weighted and re-decided). Each refuses itself when its own diagnostics say it
is unsafe (a collapse to one class, a prevalence at the boundary), and the run scores unadapted.
Drift is judged on the scores before EM. align and AdaBN assume the class mix did not change.
"""

from __future__ import annotations

import datetime as _dt
import sys
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

from pneumo.bundle.manifest import Manifest, drift_reference, read_manifest
from pneumo.config import ConfigError, parse_config, to_dict
from pneumo.io.storage import Location
from pneumo.ray_env import ensure_ray
from pneumo.score import table as T
from pneumo.score.adaptation import (
    MODEL_METHODS,
    adapt_bundle,
    adjust_prevalence,
    estimate,
    training_prior,
)
from pneumo.score.config import ScoreConfig, ScoreResult
from pneumo.score.inputs import check_input, listing_dataset
from pneumo.score.legacy import BadRun, legacy_runs, upgrade
from pneumo.score.tasks import EXPLAIN_DIR, OUTPUT_SCHEMA, score_dataset

__all__ = ["ScoreConfig", "ScoreResult", "run_score", "format_summary", "main"]


def new_run_id() -> str:
    """Sortable and unique: `20261123T161000Z-1a2b3c`."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


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


def preflight(cfg: ScoreConfig) -> tuple[Manifest, str]:
    """What can fail before Ray starts, as config errors: the bundle, the input, the run id (new,
    and not a committed run's), `--adapt`'s training prior. (the manifest, the run id)"""
    manifest = read_manifest(cfg.bundle_location)
    check_input(cfg)
    out = cfg.out_location
    run_id = cfg.run_id or new_run_id()
    if cfg.run_id and (T.is_committed(out, run_id) or (not T.exists(out) and run_id in
                                                       {m["run_id"] for m in legacy_runs(out)})):
        raise ConfigError(f"run_id {run_id!r} is a committed run of {out}; pick a new --run-id")
    if "em" in cfg.adaptations:
        training_prior(manifest)  # raises ConfigError when the bundle has no training class counts
    return manifest, run_id


def _score_files(cfg: ScoreConfig, manifest: Manifest, store: Location, to_score: Any, n: int, run_id: str,
                 side: Location) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Score `to_score` (AdaBN and/or align first with --adapt) into uncommitted files; (the files, the
    model adaptation's record)."""
    from pneumo.score.parts import PartSink

    bundle, engine, model_adapted = cfg.bundle_location, cfg.engine, None
    if set(cfg.adaptations) & set(MODEL_METHODS) and n:
        bundle, model_adapted = adapt_bundle(cfg, bundle, manifest, store, _uniform(to_score, n, cfg.adapt_sample), side)
        engine = model_adapted.get("engine_needed", cfg.engine) if cfg.engine == "auto" else cfg.engine
    if not n:
        return [], model_adapted
    sink = PartSink(cfg.out_location, run_id, OUTPUT_SCHEMA)
    score_dataset(to_score, store, manifest.input, bundle, cfg.pipeline(), run_id, engine,
                  side.join(EXPLAIN_DIR) if cfg.explain else None).write_datasink(
        sink, ray_remote_args={"num_cpus": cfg.read_cpus})  # writing is I/O: the model actors keep the CPUs
    return sink.parts, model_adapted


def _uniform(ds: Any, n: int, k: int, seed: int = 0) -> list[dict[str, Any]]:
    """`k` rows of `ds` (of `n`) drawn uniformly: a Bernoulli sample of about 3k rows, then `k` of
    those by a seeded draw in the driver (O(k) rows come back)."""
    import numpy as np

    rows = ds.random_sample(min(1.0, 3 * k / n), seed=seed).take_all() if n > k else ds.take_all()
    rows = sorted(rows, key=lambda r: r["path"])
    if len(rows) <= k:
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), k, replace=False))
    return [rows[i] for i in pick]


def _late_steps(cfg: ScoreConfig, manifest: Manifest, run_id: str, parts: list[dict[str, Any]], side: Location,
                model_adapted: dict[str, Any] | None, stages: _Stages) -> tuple[list[dict[str, Any]], dict[str, Any], Any, list[str]]:
    """Drift, then EM with --adapt, on the run's files; a drift failure is a warning, not a lost run.
    (the files, the drift verdict, the adaptation record, the warnings)"""
    from pneumo.score.drift import run_drift
    from pneumo.score.parts import add_counts, ok_sample

    out, warnings = cfg.out_location, []
    n_ok = add_counts(parts)["status"].get("ok", 0)
    reference = drift_reference(cfg.bundle_location, manifest)
    needed = (["probability", "embedding"] if reference is not None else []) + (["probabilities"] if cfg.adapt else [])
    sample = ok_sample(out, parts, needed, n_ok if needed else 0)
    try:
        drift, drift_warnings = run_drift(reference, side, sample)
        warnings += drift_warnings
    except Exception as exc:  # noqa: BLE001 - drift is a late step: it never discards scored rows
        warnings.append(f"drift not judged ({type(exc).__name__}: {exc})"[:300])
        drift = {"shift": False, "status": "failed", "line": "drift: not judged (the check failed; see warnings)"}
    stages.done("drift")
    adaptation = None
    if cfg.adapt:
        adaptation = estimate(cfg, manifest, sample, model_adapted)
        parts = adjust_prevalence(cfg, manifest, out, run_id, parts, adaptation)
        stages.done("adapt_em")
    return parts, drift, adaptation, warnings


def _prefetch_drift_imports() -> None:
    """Import the drift statistics' libraries (scipy.stats, matplotlib: over a second) in a thread
    while the actors score, rather than after them in every run's fixed cost."""
    def load() -> None:
        try:
            import scipy.spatial.distance  # noqa: F401
            import scipy.stats  # noqa: F401

            import pneumo.monitor.drift  # noqa: F401
            import pneumo.report.plots  # noqa: F401
        except Exception:  # noqa: BLE001 - the drift step imports them again and reports its own error
            pass

    threading.Thread(target=load, name="pneumo-prefetch", daemon=True).start()


def run_score(cfg: ScoreConfig) -> ScoreResult:
    """Score `cfg`'s input into the table at `cfg.out`: one commit, after one row per file is checked."""
    from pneumo.score.incremental import check_one_row_per_file, plan_run

    cfg.validate()
    stages, started = _Stages(), _now()
    manifest, run_id = preflight(cfg)
    out, side = cfg.out_location, T.run_folder(cfg.out_location, run_id)
    ensure_ray()
    ignored: list[BadRun] = []
    upgrade(out, cfg.data_location or cfg.manifest_location, bad=ignored)
    try:
        store, listing = listing_dataset(cfg)
        plan = plan_run(listing, out, manifest.sha256, cfg.pipeline(), store, cfg.incremental, cfg.verify_content)
        stages.done("list")
        n = plan.n_listed - plan.n_skipped
        _prefetch_drift_imports()
        parts, model_adapted = _score_files(cfg, manifest, store, plan.to_score, n, run_id, side)
        stages.done("read_score_write")
        check_one_row_per_file(plan.to_score, parts, run_id)
        stages.done("verify")
        parts, drift, adaptation, warnings = _late_steps(cfg, manifest, run_id, parts, side, model_adapted, stages)
        result = _result(cfg, run_id, out, side, plan, parts, drift, adaptation, warnings, ignored, stages)
        record = {**asdict(result), "started_at": started, "finished_at": _now(), "bundle": cfg.bundle,
                  "bundle_sha256": manifest.sha256, "model_uri": cfg.bundle_location.source,
                  "model": manifest.model, "model_version": manifest.version,
                  "classes": manifest.classes, "threshold": manifest.threshold_value, "config": to_dict(cfg)}
        result.version = T.commit(out, parts, OUTPUT_SCHEMA, record)
    except BaseException:
        if not T.is_committed(out, run_id):
            T.remove_uncommitted(out, run_id)  # nothing of a failed run stays behind (a killed one's: vacuum)
        raise
    T.remove_uncommitted(out, run_id, keep={p["path"] for p in parts})  # a retried write task's leftovers
    stages.done("commit")
    result.stages, result.wall_s = stages.seconds, round(time.perf_counter() - stages.t0, 3)
    return result


def _result(cfg: ScoreConfig, run_id: str, out: Location, side: Location, plan: Any, parts: list[dict[str, Any]],
            drift: dict[str, Any], adaptation: Any, warnings: list[str], ignored: list[BadRun],
            stages: _Stages) -> ScoreResult:
    from pneumo.score.parts import add_counts

    counts = add_counts(parts)
    n = plan.n_listed - plan.n_skipped
    wall = time.perf_counter() - stages.t0
    return ScoreResult(
        run_id=run_id, table=out.uri, run_dir=side.uri, n_listed=plan.n_listed, n_skipped=plan.n_skipped,
        n_scored=n, n_verified=plan.n_verified,
        counts={"ok": counts["status"].get("ok", 0), "error": counts["status"].get("error", 0)},
        labels=counts["label"], errors=counts["error_kind"], wall_s=round(wall, 3),
        images_per_s=round(n / wall, 2) if wall > 0 else 0.0, files=[p["path"] for p in parts], drift=drift,
        adaptation=adaptation, warnings=warnings, ignored_runs=[asdict(b) for b in ignored], stages=dict(stages.seconds))


def format_summary(r: ScoreResult) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in r.labels.items()) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "none"
    verified = f", {r.n_verified} of them read to verify" if r.n_verified else ""
    lines = [
        f"run {r.run_id}: committed to {r.table} (version {r.version})",
        f"  files listed {r.n_listed}, skipped (already scored, unchanged) {r.n_skipped}{verified}, scored {r.n_scored}",
        f"  ok {r.counts['ok']}, errors {r.counts['error']} ({errors})",
        f"  labels: {labels}",
    ]
    if r.ignored_runs:
        ids = ", ".join(b["run_id"] for b in r.ignored_runs)
        lines.append(f"  ignored {len(r.ignored_runs)} damaged old run(s) (marker or parts unreadable): {ids}")
    if r.drift:
        lines.append(f"  {r.drift['line']}")
    if r.adaptation:
        lines.append(f"  {r.adaptation['line']}")
    lines += [f"  warning: {w}" for w in r.warnings]
    lines.append(f"  wall {r.wall_s:.1f} s, {r.images_per_s:.1f} images/s ("
                 + ", ".join(f"{k} {v:.1f} s" for k, v in r.stages.items()) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`pneumo score`: parse flags, run, print the summary."""
    cfg = parse_config(ScoreConfig, argv, prog="pneumo score")
    try:
        result = run_score(cfg)
    except ConfigError as exc:
        print(f"pneumo score: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
