"""Evaluation reports: metrics with bootstrap 95% CIs, confusion matrix, calibration, PNG plots.

`write_report` turns labels + probabilities into `report.json`, `report.md` and PNGs for one
split (training calls it for its val/test splits, `pneumo.score.evaluate.evaluate_bundle` for any
bundle on any labelled split); `summary_table` is the terminal's metric table. Files that
could not be read or decoded are listed in the report, never dropped silently.

The positive score is `1 - P(NORMAL)`; a case is called pneumonia when `score >= threshold`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.labels import negative_index, positive_score
from pneumo.privacy import redact_errors
from pneumo.report import metrics as M
from pneumo.report import plots
from pneumo.report.flags import flags_lines, flags_markdown, format_threshold, red_flags
from pneumo.report.thresholds import THRESHOLD_METHODS

REPORT_METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
                                   "average_precision")
METRIC_NAMES: dict[str, str] = {
    "auc": "AUC (ROC)", "accuracy": "Accuracy", "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity", "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1",
    "average_precision": "Average precision",
}
PLOTS: dict[str, str] = {"roc": "roc.png", "pr": "pr.png", "calibration": "calibration.png",
                         "confusion": "confusion.png", "training_curves": "training_curves.png"}


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, nan/inf to None, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_clean(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _threshold_text(threshold: Mapping[str, Any], split: str) -> str:
    method = threshold.get("method", "default")
    value = float(threshold["value"])
    chosen_on = threshold.get("chosen_on", "val" if method in THRESHOLD_METHODS else None)
    where = "the validation split" if chosen_on == "val" else f"the {chosen_on}"
    if method == "target_sensitivity":
        how = f"the highest threshold reaching sensitivity >= {threshold.get('target')} on {where}"
    elif method == "sensitivity_lower_bound":
        how = (f"the highest threshold whose sensitivity's lower 95% confidence bound is >= "
               f"{threshold.get('target')} on {where}")
    elif method == "youden":
        how = f"maximising Youden's J (sensitivity + specificity - 1) on {where}"
    else:
        how = f"method `{method}` (not tuned on data)"
    text = (f"Decision threshold **{format_threshold(value)}** on the positive score 1 - P(NORMAL) (pneumonia when "
            f"score >= threshold), chosen by {how}.")
    if chosen_on == "val":
        text += " It is chosen on validation data only, never on test."
    if chosen_on == split:
        honest = ("the cross-validated figures (`extra.cross_validated`) are the honest estimate" if
                  split == "site sample" else "the `test` report is the honest one")
        text += (f"\n\n> Note: this report is on the `{split}` split, the same data the threshold was chosen on, "
                 f"so its thresholded metrics are optimistic; {honest}.")
    return text


VALIDATE_LOCALLY = (
    "These figures hold for the cohort these images come from: for `pneumo train`, patients carved "
    "from the training data, who were imaged like the training patients. They do not tell how the "
    "model does at another site (another scanner, another population). Before trusting it there, "
    "validate it locally: `pneumo sample SCORES --n 50 --out sample.csv` on the site's scored archive, "
    "have a radiologist fill in the labels, then `pneumo calibrate BUNDLE sample.csv --out NEW_BUNDLE` "
    "(README: *Validating at a new site*).")
SITE_NOTE = ("These figures are on this site's own labelled sample; with few images their confidence "
             "intervals are wide, and they hold for images like these.")


def where_figures_hold(extra: Mapping[str, Any] | None) -> str:
    """The one-paragraph warning next to every report's figures (a site's own sample, or not)."""
    return SITE_NOTE if (extra or {}).get("cohort") == "site" else VALIDATE_LOCALLY


def _markdown(report: dict[str, Any], threshold: Mapping[str, Any]) -> str:
    split, classes = report["split"], report["classes"]
    level = int(round(100 * report["ci_level"]))
    lines = [f"# Evaluation: `{split}` split", "", *flags_markdown(report.get("red_flags") or [])]
    if report.get("bundle"):
        b = report["bundle"]
        lines += [f"Model `{b.get('model')}`, bundle `{b.get('location')}` (version `{b.get('version')}`).", ""]
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    lines += [f"{report['n']} images ({counts}); positive class: pneumonia (any class but NORMAL).", "",
              f"> **Where these figures hold.** {report.get('where_figures_hold', VALIDATE_LOCALLY)}", ""]
    if report["n_errors"]:
        lines += [f"**{report['n_errors']} file(s) could not be read or decoded and are not in the metrics** "
                  "(listed below).", ""]
    lines += ["## Metrics", "",
              f"| metric | value | {level}% CI |", "| --- | ---: | ---: |"]
    for key in REPORT_METRICS:
        ci = report["ci"].get(key)
        ci_text = f"{_fmt(ci[0])} - {_fmt(ci[1])}" if ci else ""
        lines.append(f"| {METRIC_NAMES[key]} | {_fmt(report['metrics'].get(key))} | {ci_text} |")
    lines += ["", f"CIs: {report['bootstrap']}.", "",
              "## Threshold", "", _threshold_text(threshold, split), "",
              "## Confusion matrix", "", "Rows: true class; columns: predicted class (at the threshold).", "",
              "| true \\ predicted | " + " | ".join(classes) + " |",
              "| --- |" + " ---: |" * len(classes)]
    for name, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(f"{v:,}" for v in row) + " |")
    c = report["confusion"]
    lines += ["", f"Pneumonia vs normal: TP {c['tp']}, FN {c['fn']}, FP {c['fp']}, TN {c['tn']}.", ""]
    if "multiclass" in report:
        mc = report["multiclass"]
        lines += ["## Per class (one-vs-rest)", "", f"Class accuracy {_fmt(mc['accuracy'])}, "
                  f"macro AUC {_fmt(mc['macro_auc'])}.", "",
                  "| class | AUC | recall | precision | support |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, pc in mc["per_class"].items():
            lines.append(f"| {name} | {_fmt(pc['auc'])} | {_fmt(pc['recall'])} | {_fmt(pc['precision'])} | "
                         f"{pc['support']} |")
        lines.append("")
    if report.get("groups"):
        lines += _groups_markdown(report["groups"])
    cal = report["calibration"]
    lines += ["## Calibration", "",
              f"ECE {_fmt(cal['ece'])}, MCE {_fmt(cal['mce'])}, Brier score {_fmt(cal['brier'])} "
              f"({len(cal['counts'])} equal-width bins of the positive score).", ""]
    if report["plots"]:
        lines += ["## Plots", ""]
        for name, file in report["plots"].items():
            lines += [f"![{name}]({file})", ""]
    if report["errors"]:
        lines += [f"## Files not evaluated ({report['n_errors']})", "", "| file | kind | reason |",
                  "| --- | --- | --- |"]
        for e in report["errors"]:
            reason = str(e.get("reason", e.get("error", ""))).replace("|", "/")
            lines.append(f"| `{e.get('path', '?')}` | {e.get('kind', '')} | {reason} |")
        lines.append("")
    return "\n".join(lines)


def _group_auc(row: Mapping[str, Any]) -> str:
    """A group's AUC, only where the group holds both classes."""
    return "n/a: one class" if row["positives"] in (0, row["n"]) else _fmt(row.get("auc"))


def _groups_markdown(g: Mapping[str, Any]) -> list[str]:
    lines = ["## Per acquisition group", "",
             "Pooled figures hide a weak series; the worst group is the figure to plan with.", "",
             "| group | n | positives | sensitivity | specificity | AUC |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in g["groups"].items():
        lines.append(f"| {name} | {row['n']} | {row['positives']} | {_fmt(row.get('sensitivity'))} | "
                     f"{_fmt(row.get('specificity'))} | {_group_auc(row)} |")
    for key in ("sensitivity", "specificity", "auc"):
        if key in g["worst"]:
            w = g["worst"][key]
            lines.append(f"\nWorst {key}: **{_fmt(w['value'])}** ({w['group']}), mean over groups "
                         f"{_fmt(g['mean'][key])}.")
    return [*lines, ""]


def write_report(
    out_dir: str | os.PathLike,
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: Mapping[str, Any],
    split: str,
    history: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    errors: Sequence[Mapping[str, Any]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[str] | None = None,
    best_epoch: int | None = None,
) -> dict[str, Any]:
    """Write `report.json`, `report.md` and the PNGs for one split; returns the report dict.

    `y_true`: class indices into `classes`; `probs`: float[N, len(classes)]; `threshold`: the
    bundle's threshold dict (`value`, `method`, `target`). Metrics are pneumonia (any class but
    NORMAL) vs NORMAL on 1 - P(NORMAL) at `threshold["value"]`, each with a stratified bootstrap
    `1 - alpha` CI; three-class reports add per-class one-vs-rest metrics. `errors` (files not
    evaluated, as {path, kind, reason}) are listed in the report; `extra` is stored as is.
    With `groups` (one name per image, e.g. its acquisition series from
    `pneumo.data.datasets.acquisition_group`), metrics per group and the worst group are added: a
    validation that flatters less than the pooled figures. `red_flags`
    (`pneumo.report.flags.red_flags`) say when the model is no good; `best_epoch` (the checkpointed
    one) is marked on every panel of the training curves.
    """
    classes = list(classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_idx = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_idx), len(classes))
    value = float(threshold["value"])
    y, score = y_idx != negative_index(classes), positive_score(probs, classes)
    multi = M.multiclass_metrics(y_idx, probs, classes, threshold=value)
    report = figures(y, score, value, n_boot, seed, alpha)
    errors = redact_errors(errors or [])  # file names carry patient ids (pneumo.privacy)
    report.update(split=split, n_errors=len(errors), classes=classes, errors=errors, threshold=dict(threshold),
                  counts={c: int((y_idx == i).sum()) for i, c in enumerate(classes)},
                  confusion_matrix=multi["confusion_matrix"],
                  created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    if groups is not None and len(groups) == y.size and y.size:
        report["groups"] = M.group_metrics(y, score, list(groups), value)
    if len(classes) > 2:
        report["multiclass"] = {k: multi[k] for k in ("accuracy", "macro_auc", "per_class")}
    report["red_flags"] = red_flags(report)
    report["where_figures_hold"] = where_figures_hold(extra)
    if extra:
        report["bundle"] = extra.get("bundle")
        report["extra"] = {k: v for k, v in extra.items() if k != "bundle"}
    report["plots"] = _plots(out, split, y, score, value, multi["confusion_matrix"], classes, history, best_epoch)
    report = _clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report, threshold))
    return report


def figures(y: np.ndarray, score: np.ndarray, threshold: float, n_boot: int, seed: int,
             alpha: float) -> dict[str, Any]:
    """The pneumonia-vs-normal figures of a report: metrics, bootstrap CIs, confusion, calibration."""
    binary = M.binary_metrics(y, score, threshold)
    ci = M.bootstrap_ci(y, score, threshold, n_boot=n_boot, seed=seed, alpha=alpha)
    return {
        "n": int(y.size),
        "positive": "any class but NORMAL; score = 1 - P(NORMAL)",
        "metrics": {k: binary[k] for k in REPORT_METRICS},
        "ci": {k: list(v) for k, v in ci.items()},
        "ci_level": 1 - alpha,
        "bootstrap": f"stratified percentile bootstrap, {n_boot} resamples, seed {seed}",
        "confusion": binary["confusion"],
        "calibration": M.calibration(y, np.clip(score, 0.0, 1.0)),
    }


def _plots(out: Path, split: str, y: np.ndarray, score: np.ndarray, threshold: float, confusion: Any,
           classes: list[str], history: Sequence[Mapping[str, Any]] | None,
           best_epoch: int | None = None) -> dict[str, str]:
    """The report's PNGs (none for an empty split but the training curves): {name: file name}."""
    made: dict[str, str] = {}
    if y.size:
        made["roc"] = plots.roc_plot(y, score, out / PLOTS["roc"], threshold=threshold,
                                     title=f"ROC, {split} split (pneumonia vs normal)").name
        made["pr"] = plots.pr_plot(y, score, out / PLOTS["pr"], threshold=threshold,
                                   title=f"Precision-recall, {split} split").name
        made["calibration"] = plots.calibration_plot(
            y, np.clip(score, 0.0, 1.0), out / PLOTS["calibration"], title=f"Reliability, {split} split").name
        made["confusion"] = plots.confusion_plot(confusion, classes, out / PLOTS["confusion"],
                                                 title=f"Confusion matrix, {split} split (threshold {format_threshold(threshold)})").name
    if history:
        made["training_curves"] = plots.training_curves(history, out / PLOTS["training_curves"],
                                                          best_epoch=best_epoch).name
    return made


def summary_table(report: Mapping[str, Any]) -> str:
    """A plain-text metric table with CIs, for the terminal."""
    level = int(round(100 * report["ci_level"]))
    t = report["threshold"]
    lines = [f"[pneumo evaluate] {report['split']} split: {report['n']} images"
             + (f", {report['n_errors']} not evaluated (unreadable/undecodable)" if report["n_errors"] else ""),
             *flags_lines(report.get("red_flags") or []),
             f"  threshold {format_threshold(t['value'])} ({t.get('method', 'default')}"
             + (f", target sensitivity {t['target']}" if t.get("target") else "") + ")",
             f"  {'metric':<22}{'value':>8}   {level}% CI"]
    for key in REPORT_METRICS:
        ci = report["ci"].get(key)
        ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        lines.append(f"  {METRIC_NAMES[key]:<22}{_fmt(report['metrics'].get(key)):>8}   {ci_text}")
    c = report["confusion"]
    lines.append(f"  confusion: TP {c['tp']}  FN {c['fn']}  FP {c['fp']}  TN {c['tn']}")
    if "multiclass" in report:
        lines.append(f"  class accuracy {_fmt(report['multiclass']['accuracy'])}, "
                     f"macro AUC {_fmt(report['multiclass']['macro_auc'])}")
    if report.get("where_figures_hold", VALIDATE_LOCALLY) == VALIDATE_LOCALLY:
        lines.append("  these figures hold for the training cohort; a new site validates locally: "
                     "pneumo sample -> label -> pneumo calibrate (README: Validating at a new site)")
    return "\n".join(lines)
