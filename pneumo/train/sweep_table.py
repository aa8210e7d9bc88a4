"""The result of a sweep: every trial in one table, ranked on validation, and the best trial's bundle.

    rows = trial_rows(cfg, results, out)        # one row per trial (Tune's ResultGrid + its run folder)
    write_table(rows, out, options, metric)     # trials.md, trials.csv, trials.png

A row: the trial's options; `status` (ok: finished and exported; stopped: stopped early by ASHA,
no bundle; error: the trial failed, `error` says why; unfinished: the sweep was interrupted); `epochs`; `rank_value` (the sweep metric's best
epoch on val: the highest val AUC or lowest val loss, what the trial is ranked by); for finished
trials the val report's AUC / sensitivity / specificity at the bundle's threshold with their
bootstrap 95% CIs and the worst acquisition group (lowest per-group AUC; where every group holds one
class, the lowest per-group sensitivity or specificity,
`pneumo.report.metrics.group_metrics`); the bundle and the MLflow run. Only the val split is read:
the carved test split is never used to choose. The best trial is the best-ranked one with a bundle;
its bundle is copied to `<out>/bundle`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from pneumo.config import to_dict
from pneumo.report.plots import sweep_plot
from pneumo.track.tracking import Tracker, prepare, warn
from pneumo.train.sweep_config import COMBO, TRIALS_DIR

COLUMNS = ["rank", "trial_id", "status", "epochs", "rank_value", "val_auc", "val_auc_ci", "val_sensitivity",
           "val_sensitivity_ci", "val_specificity", "val_specificity_ci", "threshold", "worst_group",
           "worst_group_auc", "error", "bundle", "mlflow_run"]


def open_sweep_run(cfg: Any, uri: str) -> Tracker:
    """The sweep's own MLflow run (the trials' parent); the same one when the sweep resumes."""
    if not uri:
        return Tracker(None, None)
    experiment_id = prepare(uri, cfg.sweep_name)  # the schema, once, before any trial logs
    if experiment_id is None:
        return Tracker(None, None)
    run = Tracker.start(uri, experiment_id, f"sweep {cfg.sweep_name}", f"sweep:{os.path.abspath(cfg.out)}",
                        {"pneumo.sweep": cfg.sweep_name})
    run.log_params({k: json.dumps(v) if isinstance(v, dict) else v for k, v in to_dict(cfg).items()})
    return run


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _best(series: list[float], mode: str) -> float | None:
    values = [v for v in series if isinstance(v, int | float) and math.isfinite(v)]
    return (max(values) if mode == "max" else min(values)) if values else None


def _val_report(row: dict[str, Any], out: Path) -> None:
    """The finished trial's val report: metrics at the bundle's threshold, CIs, worst group."""
    report = _json(out / "report" / "val" / "report.json")
    if not report:
        return
    for key in ("auc", "sensitivity", "specificity"):
        row[f"val_{key}"] = report["metrics"].get(key)
        ci = report.get("ci", {}).get(key)
        row[f"val_{key}_ci"] = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    row["threshold"] = report.get("threshold", {}).get("value")
    worst = (report.get("groups") or {}).get("worst", {})
    if worst.get("auc"):
        row["worst_group"], row["worst_group_auc"] = worst["auc"]["group"], worst["auc"]["value"]
    else:  # one class per group (no group AUC): the group with the lowest sensitivity or specificity
        rates = [(w["value"], f"{w['group']} ({key} {w['value']:.3f})") for key, w in worst.items()]
        if rates:
            row["worst_group"] = min(rates)[1]


def tune_statuses(experiment_path: str) -> dict[str, str]:
    """Tune's status of every trial (TERMINATED, ERROR, RUNNING, PENDING, ...) from the experiment state."""
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path).trials}
    except Exception:  # noqa: BLE001 - no state to read: statuses from the results alone
        return {}


def trial_row(cfg: Any, result: Any, out_root: Path, tune_status: str = "TERMINATED") -> dict[str, Any]:
    """One trial of Tune's ResultGrid as a table row (see the module docstring)."""
    trial_id = Path(result.path).name
    params = _json(Path(result.path) / "params.json") or result.metrics.get("config") or {}
    params = params.get(COMBO, params)
    out = out_root / TRIALS_DIR / trial_id
    summary = _json(out / "summary.json")
    history = result.metrics_dataframe
    series = list(history[cfg.metric]) if history is not None and cfg.metric in history else []
    row: dict[str, Any] = {"trial_id": trial_id, **{k: params.get(k) for k in cfg.search},
                           "epochs": int(history["epoch"].max()) if series else 0,
                           "rank_value": _best(series, cfg.mode), "error": ""}
    if summary and os.path.exists(os.path.join(summary["bundle"], "manifest.json")):
        row.update(status="ok", epochs=summary["epochs_run"], bundle=summary["bundle"],
                   mlflow_run=(summary.get("mlflow") or {}).get("run_id", ""))
        _val_report(row, out)
    elif result.error is not None:
        row.update(status="error", error=f"{type(result.error).__name__}: {str(result.error).splitlines()[-1][:300]}"
                   if str(result.error) else type(result.error).__name__)
    else:  # ended by the scheduler (ASHA), or not finished when the sweep was interrupted
        row["status"] = "stopped" if tune_status == "TERMINATED" else "unfinished"
    return row


def ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first by `rank_value` (val only); trials without a value (failed before an epoch) last."""
    def key(r: dict[str, Any]) -> tuple[int, float]:
        v = r.get("rank_value")
        return (1, 0.0) if v is None else (0, -v if mode == "max" else v)

    out = sorted(rows, key=key)
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_table(rows: list[dict[str, Any]], out: Path, options: list[str], metric: str) -> dict[str, str]:
    """trials.csv (every column), trials.md (the ranked table) and trials.png (metric per option)."""
    columns = COLUMNS[:2] + options + COLUMNS[2:]
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: _fmt(r.get(k)) for k in columns} for r in rows)
    shown = [c for c in columns if c not in ("bundle", "mlflow_run", "error")]
    lines = [f"Ranked on the best epoch's {metric} on val (`rank_value`); val AUC / sensitivity / specificity "
             "at the bundle's threshold with bootstrap 95% CIs; worst group = lowest per-group val AUC. "
             "stopped = stopped early by ASHA (no bundle); unfinished = the sweep was interrupted (run it again to resume). "
             "The test split is not read.", "",
             "| " + " | ".join(shown) + " |", "| " + " | ".join("---" for _ in shown) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows]
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        lines += ["", "Failed trials:", *[f"- {r['trial_id']}: {r['error']}" for r in failed]]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    sweep_plot(rows, options, "rank_value", out / "trials.png", title=f"{metric} (best epoch, val) per option")
    return {"csv": str(out / "trials.csv"), "md": str(out / "trials.md"), "png": str(out / "trials.png")}


def _close_trials(rows: list[dict[str, Any]], uri: str, experiment: str) -> None:
    """Trials stopped by ASHA or failed left their MLflow run RUNNING (their process was ended): KILLED/FAILED."""
    experiment_id = prepare(uri, experiment) if uri else None
    if experiment_id is None:
        return
    for r in rows:
        if r["status"] == "ok":
            continue
        out = Path(r["trial_out"])
        run = Tracker.start(uri, experiment_id, r["trial_id"], f"{out / 'ray_results'}/{r['trial_id']}", {},
                            create=False)
        run.finish("KILLED" if r["status"] == "stopped" else "FAILED")


def _register(cfg: Any, plan: dict[str, Any], best: dict[str, Any]) -> dict[str, str] | None:
    """The best bundle as a registered version, in its trial's MLflow run (a failure is a warning)."""
    from pneumo.bundle.registry import register_bundle
    from pneumo.io.storage import Location

    try:
        return register_bundle(Location.resolve(best["bundle"]), cfg.register, plan["tracking_uri"],
                               run_id=best.get("mlflow_run") or None, experiment=plan["name"])
    except Exception as exc:  # noqa: BLE001 - the bundle is there; `pneumo register` can redo this
        warn(f"registering the best bundle as {cfg.register} failed ({type(exc).__name__}: {str(exc)[:200]}); "
             f"retry with `pneumo register {best['bundle']} --name {cfg.register}`")
        return None


def finish_sweep(cfg: Any, plan: dict[str, Any], results: Any, parent: Tracker) -> dict[str, Any]:
    """The ranked table, its files, the best bundle in `<out>/bundle`, the sweep run closed (and the
    best bundle registered with `--register`)."""
    out = Path(plan["out"])
    statuses = tune_statuses(results.experiment_path)
    rows = ranked([trial_row(cfg, r, out, statuses.get(Path(r.path).name, "TERMINATED")) for r in results], cfg.mode)
    for r in rows:
        r["trial_out"] = str(out / TRIALS_DIR / r["trial_id"])
    files = write_table(rows, out, list(cfg.search), cfg.metric)
    best = next((r for r in rows if r["status"] == "ok"), None)
    if best is not None:
        shutil.copytree(best["bundle"], out / "bundle", dirs_exist_ok=True)
        files["bundle"] = str(out / "bundle")
    _close_trials(rows, plan["tracking_uri"], plan["name"])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "stopped", "error", "unfinished")}
    summary = {"name": plan["name"], "metric": cfg.metric, "mode": cfg.mode, "counts": counts, "best": best,
               "files": files, "trials": rows}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    if parent.on:
        parent.log_metrics({f"best_{k}": best[k] for k in ("rank_value", "val_auc") if best and best.get(k)})
        parent.set_tags({"pneumo.best_trial": best["trial_id"] if best else "", "pneumo.counts": counts})
        for path in (files["csv"], files["md"], files["png"]):
            parent.log_artifact(path)
        parent.finish()
    if cfg.register and best is not None:
        summary["registered"] = _register(cfg, plan, best)
    resume = " (run again to resume)" if counts["unfinished"] else ""
    print(f"[pneumo sweep] {plan['name']}: {counts['ok']} finished, {counts['stopped']} stopped early, "
          f"{counts['error']} failed, {counts['unfinished']} unfinished{resume}; best {best['trial_id'] if best else 'none'} "
          f"({cfg.metric} {_fmt(best['rank_value']) if best else 'n/a'} on val)\n"
          f"  table  {files['md']} (+ trials.csv, trials.png)" + (f"\n  bundle {files['bundle']}" if best else ""),
          flush=True)
    return {"trials": rows, "best": best, "files": files, **({"registered": summary["registered"]}
                                                              if "registered" in summary else {})}
