"""`pneumo train`'s MLflow run (`pneumo.track.tracking`): opened by the driver before the workers
start, logged per epoch by rank 0 only, closed by the driver with the final metrics, the reports
and the bundle as artifacts, and (with `--register NAME`) the bundle registered as a version.

    run = open_run(cfg, records, tags={"mlflow.parentRunId": ...})   # params, tags; schema made first
    fit(..., tracking=run_config(run))                               # -> train_loop_config["tracking"]
    epoch_tracker(config["tracking"]).log_metrics(metrics, step)     # in the worker, rank 0
    close_run(run, cfg, summary, out)                                # final metrics, artifacts, registry

Tags: `pneumo.data_fingerprint`, `mlflow.source.git.commit`, `pneumo.ray_job_id`, `pneumo.bundle_sha256`.
With `--no-tracking` every call here is a no-op; a store that fails is a warning (the run goes on).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pneumo.config import to_dict
from pneumo.data.datasets import fingerprint
from pneumo.io.storage import Location
from pneumo.ray_env import job_submission_id
from pneumo.track.tracking import Tracker, prepare, tracking_uri, warn

EPOCH_METRICS = ("train_loss", "val_loss", "val_auc", "val_accuracy", "val_sensitivity", "val_specificity",
                 "lr", "train_images_per_s", "train_seconds")


def git_commit() -> str:
    """The commit of the checkout pneumo runs from ('' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def ray_job_id() -> str:
    """The Ray job's submission id under `ray job submit` / KubeRay, else this driver's Ray job id."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return job_submission_id()
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001
        return ""


def open_run(cfg: Any, records: list[Any], tags: Mapping[str, Any] | None = None) -> Tracker:
    """The training run's MLflow run (the same one again when this Ray Train run resumes)."""
    if not cfg.tracking:
        return Tracker(None, None)
    uri = tracking_uri(cfg.tracking_uri)
    experiment_id = prepare(uri, cfg.experiment)
    if experiment_id is None:
        return Tracker(None, None)
    key = f"{cfg.storage.rstrip('/')}/{cfg.run_name}"
    run = Tracker.start(uri, experiment_id, cfg.run_name, key, {
        "pneumo.data_fingerprint": fingerprint(records), "mlflow.source.git.commit": git_commit(),
        "pneumo.ray_job_id": ray_job_id(), "pneumo.model": cfg.model, **(tags or {})})
    run.log_params(to_dict(cfg))
    if run.on:
        print(f"[pneumo train] tracking: MLflow run {run.run_id} at {uri}", flush=True)
    return run


def run_config(run: Tracker) -> dict[str, Any] | None:
    """What the workers need to log to the run (None: not tracked)."""
    return {"uri": run.uri, "run_id": run.run_id} if run.on else None


def epoch_tracker(config: Mapping[str, Any] | None) -> Tracker:
    """Rank 0's handle on the run (a no-op one when the run is not tracked)."""
    return Tracker(config["uri"], config["run_id"]) if config else Tracker(None, None)


def log_epoch(run: Tracker, metrics: Mapping[str, Any]) -> None:
    """One epoch's metrics, sent in the background (the loop goes on; `run.flush()` at the end)."""
    run.log_metrics({k: metrics[k] for k in EPOCH_METRICS if k in metrics}, step=int(metrics["epoch"]), wait=False)


def _final_metrics(summary: Mapping[str, Any], out: Location) -> dict[str, float]:
    """final_<split>_<metric> at the bundle's threshold, and the bootstrap CIs from the reports."""
    final = {f"final_{split}_{k}": v for split, m in summary["metrics"].items() for k, v in m.items()}
    for split, where in (summary.get("reports") or {}).items():
        try:
            report = json.loads(Location.of(where).join("report.json").read_bytes())
        except (OSError, ValueError):
            continue
        for key, (low, high) in report.get("ci", {}).items():
            final[f"final_{split}_{key}_ci_low"], final[f"final_{split}_{key}_ci_high"] = low, high
    final["epochs_run"], final["best_epoch"] = summary["epochs_run"], summary["best_epoch"]
    return final


def _log_folder(run: Tracker, folder: Location, path: str) -> None:
    """A folder (local, or copied from S3 first) as artifacts under `path`."""
    if not folder.is_s3:
        if os.path.isdir(folder.path):
            run.log_artifacts(folder.path, path)
        return
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        try:
            pafs.copy_files(folder.path, tmp, source_filesystem=folder.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except OSError:
            return
        run.log_artifacts(tmp, path)


def close_run(run: Tracker, cfg: Any, summary: dict[str, Any], out: Location, sha256: str) -> None:
    """Final metrics, the bundle / reports / config / summary as artifacts, FINISHED; then the registry."""
    if run.on:
        run.log_metrics(_final_metrics(summary, out), step=int(summary["epochs_run"]))
        run.set_tags({"pneumo.bundle_sha256": sha256, "pneumo.bundle": summary["bundle"]})
        _log_folder(run, out.join("bundle"), "bundle")
        _log_folder(run, out.join("report"), "report")
        for name in ("config.yaml", "summary.json"):
            if not out.is_s3 and os.path.exists(out.join(name).path):
                run.log_artifact(out.join(name).path)
        run.finish()
    if cfg.register:
        from pneumo.bundle.registry import register_bundle

        try:
            reg = register_bundle(out.join("bundle"), cfg.register, tracking_uri(cfg.tracking_uri),
                                  run_id=run.run_id if run.on else None, experiment=cfg.experiment)
        except Exception as exc:  # noqa: BLE001 - the bundle is written; registering can be redone
            warn(f"registering the bundle as {cfg.register} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                 f"retry with `pneumo register {summary['bundle']} --name {cfg.register}`")
            return
        summary["registered"] = reg
        print(f"[pneumo train] registered {reg['uri']} (bundle sha256 {sha256[:12]})", flush=True)
