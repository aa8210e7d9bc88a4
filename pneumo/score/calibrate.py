"""`pneumo calibrate`: validate a bundle on a site's labelled sample, then recalibrate it for that site.

    pneumo calibrate BUNDLE LOCAL_DATA --out NEW_BUNDLE [--refit-head] [--target-sensitivity 0.95]
                     [--rule point|lower_bound]

`LOCAL_DATA` is a site's labelled sample: a folder with `NORMAL/` and `PNEUMONIA/` (any nesting
below), or the CSV `pneumo sample` writes once its `label` column is filled in. In order:

1. **The bundle as it is** on the sample: AUC, sensitivity and specificity at its own threshold,
   with bootstrap CIs, and its calibration (report `parent/`). Printed first.
2. **Recalibration** on the sample: Platt scaling (temperature for three classes) refitted and
   folded into the head; with `--refit-head`, the binary linear head itself is refitted on the
   sample's embeddings (the backbone kept), pulled toward the current head (L2 toward the current
   weights; the pull is chosen by patient-grouped cross-validation). Toward the current head and not
   together with training features, because a bundle carries no training features (only val's
   statistics), and a pull keeps what training learned where 50 images say little.
3. **The operating point**, re-chosen on the sample by `--rule`: `point` (the highest threshold
   whose sensitivity on the sample reaches `--target-sensitivity`) or `lower_bound` (whose
   sensitivity's lower 95% Wilson bound reaches it: conservative, and refused with the reason when
   the sample is too small for it). How sure it is: bootstrap CIs of sensitivity and specificity at
   it, and cross-validated figures of the whole procedure (recalibrate + choose the threshold on
   4/5 of the patients, measure on the rest), the honest estimate for new images of this site.
4. **A new bundle version** at `--out`: the head, the ONNX graph (parity-checked), the drift
   reference grown by the sample, and a manifest whose `lineage` names the parent (sha256), the
   sample (fingerprint, size, counts) and both reports. It scores and serves like any other bundle.

A sample with fewer than `--min-per-class` images of a class (default 10) is refused: it cannot
say anything about that class.
"""

from __future__ import annotations

import datetime as _dt
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.bundle.manifest import (
    INT8_FILE,
    ONNX_FILE,
    BundleError,
    Manifest,
    drift_reference,
    read_file,
    read_manifest,
)
from pneumo.config import ConfigError, parse_config
from pneumo.data.datasets import fingerprint, labelled_sample
from pneumo.data.listing import DataError
from pneumo.io.reading import read_image
from pneumo.io.storage import Location
from pneumo.labels import is_positive, positive_score
from pneumo.models.calibration import (
    apply_calibration,
    choose_refit_strength,
    fit_calibration,
    fold_calibration,
    head_weights,
    refit_head,
    set_head,
)
from pneumo.monitor.drift import FILE_NAME as DRIFT_FILE
from pneumo.precision import ENGINES, PRECISIONS
from pneumo.report.metrics import bootstrap_ci, split_metrics
from pneumo.report.thresholds import threshold_record
from pneumo.report.writer import write_report

RULES = {"point": "target_sensitivity", "lower_bound": "sensitivity_lower_bound"}


@dataclass
class CalibrateConfig:
    """Validate a bundle on a site's labelled sample, then write a recalibrated bundle for that site."""

    bundle: str = field(metadata={"positional": True, "help": "the model bundle (folder or s3://)"})
    data: str = field(metadata={"positional": True, "help": "the site's labelled sample: a folder with NORMAL/ "
                                                            "and PNEUMONIA/, or a labelled CSV from pneumo sample"})
    out: str = field(default="", metadata={"help": "where the new bundle goes (required)"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})
    target_sensitivity: float = field(default=0.95, metadata={"help": "sensitivity the new threshold aims at"})
    rule: str = field(default="point", metadata={
        "choices": list(RULES), "help": "point: sensitivity on the sample reaches the target; lower_bound: its "
                                        "lower 95% bound does (conservative)"})
    refit_head: bool = field(default=False, metadata={
        "help": "also refit the linear head on the sample's embeddings, pulled toward the current head"})
    min_per_class: int = field(default=10, metadata={"help": "fewest images of a class the sample may have"})
    reports: str = field(default="", metadata={"help": "folder for the two reports (default: <out>-reports, local)"})
    engine: str = field(default="auto", metadata={"choices": list(ENGINES)})
    precision: str = field(default="auto", metadata={"choices": list(PRECISIONS)})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs"})

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("out: required (--out NEW_BUNDLE, a folder or s3:// prefix)")
        if not 0 < self.target_sensitivity < 1 or self.min_per_class < 2 or self.n_boot < 1:
            raise ConfigError("need 0 < target_sensitivity < 1, min_per_class >= 2 and n_boot >= 1")

    @property
    def report_dir(self) -> Path:
        return Path(self.reports or f"{Location.resolve(self.out).name}-reports" if self.out.startswith("s3://")
                    else self.reports or f"{self.out.rstrip('/')}-reports")


@dataclass
class Sample:
    """The site's readable labelled images, their parent-bundle outputs and their patients."""

    records: list[Any]
    images: np.ndarray
    labels: np.ndarray  # class indices into the bundle's classes
    probs: np.ndarray
    features: np.ndarray
    errors: list[dict[str, str]]

    @property
    def groups(self) -> list[str]:
        return [r.patient_id or r.path for r in self.records]


def load_sample(cfg: CalibrateConfig, data: Location, manifest: Manifest, predictor: Any) -> Sample:
    """Read and score the site's sample with the parent bundle; refuse one too small to say anything."""
    records = labelled_sample(data, manifest.classes)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: read_image(data.at(r.path), manifest.input), records))
    errors = [{"path": r.path, "kind": res.error.kind, "reason": res.error.message}
              for r, res in zip(records, results) if res.error is not None]
    kept = [(r, res.image) for r, res in zip(records, results) if res.error is None]
    labels = np.array([manifest.classes.index(r.label) for r, _ in kept], dtype=np.int64)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(manifest.classes)}
    short = {c: n for c, n in counts.items() if n < cfg.min_per_class}
    if short:
        raise ConfigError(f"the sample has {', '.join(f'{n} {c}' for c, n in counts.items())} readable images: at "
                          f"least {cfg.min_per_class} of each class are needed to say anything about that class "
                          f"({', '.join(short)}); label more images")
    images = np.stack([img for _, img in kept])
    probs, features = predictor.predict_with_features(images)
    return Sample([r for r, _ in kept], images, labels, probs, features, errors)


def recalibrate(sample_probs: np.ndarray, features: np.ndarray, labels: np.ndarray, groups: list[str],
                classes: list[str], head: tuple[np.ndarray, float] | None) -> tuple[dict[str, Any], np.ndarray]:
    """(the calibration record, the recalibrated probabilities) fitted on these images: Platt or
    temperature scaling of the parent's outputs, or (with the current `head` given) a refitted head."""
    if head is None:
        cal = fit_calibration("platt" if len(classes) == 2 else "temperature", labels, sample_probs, classes)
        return {**cal, "fitted_on": "site sample"}, apply_calibration(sample_probs, cal)
    y = is_positive(labels, classes)
    strength, cv = choose_refit_strength(features, y, groups, *head)
    w, b = refit_head(features, y, *head, strength)
    p = 1 / (1 + np.exp(-(features @ w + b)))
    cal = {"method": "refit_head", "strength": strength, "cv_log_loss": cv, "fitted_on": "site sample",
           "n": int(len(y)), "prevalence": float(y.mean()), "weight": w, "bias": b}
    return cal, np.stack([1 - p, p], axis=1).astype(np.float32)


def cross_validated(sample: Sample, classes: list[str], head: tuple[np.ndarray, float] | None, method: str,
                    target: float, n_boot: int) -> dict[str, Any]:
    """The whole procedure (recalibrate + choose the threshold) on 4/5 of the patients, measured on
    the rest (scikit-learn's StratifiedGroupKFold): sensitivity and specificity with bootstrap CIs."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = is_positive(sample.labels, classes)
    folds = max(2, min(5, int(np.bincount(y).min())))
    called = np.zeros(len(y), dtype=bool)
    held_scores = np.zeros(len(y))
    for fit, test in StratifiedGroupKFold(folds, shuffle=True, random_state=0).split(sample.features, y, sample.groups):
        groups = [sample.groups[i] for i in fit]
        cal, p_fit = recalibrate(sample.probs[fit], sample.features[fit], sample.labels[fit], groups, classes, head)
        t = threshold_record(sample.labels[fit], p_fit, classes, method, target)["value"]
        p_test = _apply(cal, sample.probs[test], sample.features[test])
        held_scores[test] = positive_score(p_test, classes)
        called[test] = held_scores[test] >= t
    # bootstrap over the held-out decisions (scores are per-fold, so the CIs use the decisions themselves)
    ci = bootstrap_ci(y, called.astype(float), 0.5, n_boot=n_boot, metrics=("sensitivity", "specificity"))
    return {"folds": folds, "sensitivity": float(called[y == 1].mean()), "specificity": float(1 - called[y == 0].mean()),
            "ci": {k: list(v) for k, v in ci.items()}}


def _apply(cal: dict[str, Any], probs: np.ndarray, features: np.ndarray) -> np.ndarray:
    if cal["method"] == "refit_head":
        p = 1 / (1 + np.exp(-(features @ cal["weight"] + cal["bias"])))
        return np.stack([1 - p, p], axis=1).astype(np.float32)
    return apply_calibration(probs, cal)


def operating_point(labels: np.ndarray, probs: np.ndarray, classes: list[str], cfg: CalibrateConfig) -> dict[str, Any]:
    """The new threshold dict (chosen on the sample by the rule), with bootstrap CIs at it; refuses a
    lower-bound rule the sample is too small for."""
    method = RULES[cfg.rule]
    y = is_positive(labels, classes)
    if method == "sensitivity_lower_bound":
        from scipy.stats import binomtest

        n_pos = int(y.sum())
        best = binomtest(n_pos, n_pos).proportion_ci(0.95, "wilson").low
        if best < cfg.target_sensitivity:
            raise ConfigError(f"--rule lower_bound: with {n_pos} positive images even a perfect sensitivity is only "
                              f"sure to be >= {best:.3f} (95% lower bound), below the target "
                              f"{cfg.target_sensitivity}; label more positive images, lower "
                              f"--target-sensitivity, or use --rule point")
    threshold = threshold_record(labels, probs, classes, method, cfg.target_sensitivity)
    score = positive_score(probs, classes)
    ci = bootstrap_ci(y, score, threshold["value"], n_boot=cfg.n_boot, metrics=("sensitivity", "specificity"))
    return {**threshold, "chosen_on": "site sample", "ci": {k: list(v) for k, v in ci.items()}}


def _summary(label: str, labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float,
             n_boot: int) -> dict[str, Any]:
    m = split_metrics(labels, probs, classes, threshold)
    ci = bootstrap_ci(is_positive(labels, classes), positive_score(probs, classes), threshold, n_boot=n_boot,
                      metrics=("auc", "sensitivity", "specificity"))
    return {"what": label, **m, "threshold": threshold, "ci": {k: list(v) for k, v in ci.items()}}


def _line(s: dict[str, Any]) -> str:
    def f(k: str) -> str:
        lo, hi = s["ci"].get(k, (float("nan"), float("nan")))
        return f"{k} {s[k]:.3f} [{lo:.3f}, {hi:.3f}]" if k in s else f"{k} n/a"

    return f"{s['what']}: {f('auc')}, {f('sensitivity')}, {f('specificity')} at threshold {s['threshold']:.4g}"


# ---------------------------------------------------------------- the new bundle


def _site_reference(bundle: Location, manifest: Manifest, sample: Sample, probs: np.ndarray,
                    cal: dict[str, Any], threshold: float) -> dict[str, bytes]:
    """The parent's drift reference grown by the sample (embeddings and new scores); the reference
    scores are re-mapped through a Platt/temperature recalibration, and replaced by the sample's
    alone after a head refit (the old scores cannot be recomputed without the training images)."""
    ref = drift_reference(bundle, manifest)
    if ref is None:
        return {}
    classes = manifest.classes
    old = None
    if cal["method"] == "platt":
        old = positive_score(apply_calibration(np.stack([1 - ref.scores, ref.scores], axis=1), cal), classes)
    elif cal["method"] == "refit_head":
        old = np.zeros(0, np.float32)
    grown = ref.extend(sample.features, positive_score(probs, classes), threshold, reference_scores=old)
    return grown.to_files()


def write_site_bundle(cfg: CalibrateConfig, bundle: Location, manifest: Manifest, model: Any, sample: Sample,
                      cal: dict[str, Any], probs: np.ndarray, threshold: dict[str, Any],
                      lineage: dict[str, Any]) -> Manifest:
    """The parent's weights with the new head (Platt folded in, or refitted), a parity-checked ONNX
    graph, the grown drift reference, the other files copied; `lineage` in the manifest."""
    from pneumo.bundle.store import save_bundle  # start-up time: see run_calibrate

    if cal["method"] == "refit_head":
        set_head(model, manifest.model, cal["weight"], cal["bias"])
    else:
        fold_calibration(model, manifest.model, cal)
    extra = {name: read_file(bundle, manifest, name) for name in manifest.files
             if name not in (ONNX_FILE, INT8_FILE, DRIFT_FILE)}
    extra.update(_site_reference(bundle, manifest, sample, probs, cal, threshold["value"]))
    record = {k: v for k, v in cal.items() if k not in ("weight", "bias")}
    metrics = {**manifest.metrics, "site": lineage["reports"]}
    return save_bundle(model, Location.resolve(cfg.out, cfg.s3_endpoint), manifest.model, manifest.classes,
                       manifest.input, threshold={k: v for k, v in threshold.items() if k != "ci"}, metrics=metrics,
                       training=manifest.training, model_options=manifest.model_options,
                       version=f"{manifest.version}+site-{lineage['sample']['fingerprint'][:8]}",
                       parity_images=sample.images, extra_files=extra,
                       extra={"calibration": record, "lineage": lineage})


def run_calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    """Report the bundle as it is on the site's sample, recalibrate, write the new bundle; the lineage."""
    # start-up time: torch and the engines only once the flags are good
    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import load_model

    bundle, data = Location.resolve(cfg.bundle, cfg.s3_endpoint), Location.resolve(cfg.data, cfg.s3_endpoint)
    manifest = read_manifest(bundle)
    if cfg.refit_head and len(manifest.classes) != 2:
        raise ConfigError("--refit-head refits a binary head; this bundle has classes "
                          f"{manifest.classes} (recalibrate without --refit-head: temperature scaling)")
    sample = load_sample(cfg, data, manifest, Predictor(bundle, engine=cfg.engine, precision=cfg.precision))
    classes = manifest.classes
    before = _summary("the bundle as it is on this sample", sample.labels, sample.probs, classes,
                      manifest.threshold_value, cfg.n_boot)
    print(f"[pneumo calibrate] {_line(before)}", flush=True)
    site = {"cohort": "site", "bundle": {"location": str(bundle), "model": manifest.model,
                                         "version": manifest.version, "sha256": manifest.sha256}}
    write_report(cfg.report_dir / "parent", sample.labels, sample.probs, classes, manifest.threshold, "site sample",
                 None, site, errors=sample.errors, n_boot=cfg.n_boot)
    model = load_model(bundle, manifest)
    head = head_weights(model, manifest.model) if cfg.refit_head else None
    cal, probs = recalibrate(sample.probs, sample.features, sample.labels, sample.groups, classes, head)
    threshold = operating_point(sample.labels, probs, classes, cfg)
    after = _summary("recalibrated, on the same sample", sample.labels, probs, classes, threshold["value"], cfg.n_boot)
    cv = cross_validated(sample, classes, head, RULES[cfg.rule], cfg.target_sensitivity, cfg.n_boot)
    lineage = _lineage(cfg, bundle, manifest, sample, {"parent": before, "recalibrated": after, "cross_validated": cv})
    write_report(cfg.report_dir / "recalibrated", sample.labels, probs, classes, threshold, "site sample", None,
                 {**site, "cross_validated": cv}, errors=sample.errors, n_boot=cfg.n_boot)
    new = write_site_bundle(cfg, bundle, manifest, model, sample, cal, probs, threshold, lineage)
    print(f"[pneumo calibrate] {_line(after)}\n[pneumo calibrate] cross-validated on this site's patients "
          f"({cv['folds']} folds), what to expect on new images from this site: sensitivity "
          f"{_ci(cv, 'sensitivity')}, specificity {_ci(cv, 'specificity')}", flush=True)
    print(f"[pneumo calibrate] wrote {cfg.out} (version {new.version}, parent {manifest.sha256[:12]}); reports in "
          f"{cfg.report_dir}/parent and {cfg.report_dir}/recalibrated\n"
          f"  next: pneumo score ARCHIVE --bundle {cfg.out} --out SCORES", flush=True)
    return lineage


def _ci(d: dict[str, Any], key: str) -> str:
    lo, hi = d["ci"][key]
    return f"{d[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _lineage(cfg: CalibrateConfig, bundle: Location, manifest: Manifest, sample: Sample,
             reports: dict[str, Any]) -> dict[str, Any]:
    return {
        "operation": "calibrate", "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "parent": {"sha256": manifest.sha256, "version": manifest.version, "location": str(bundle)},
        "sample": {"fingerprint": fingerprint(sample.records), "n": len(sample.records),
                   "counts": {c: int((sample.labels == i).sum()) for i, c in enumerate(manifest.classes)},
                   "unreadable": len(sample.errors)},
        "rule": cfg.rule, "target_sensitivity": cfg.target_sensitivity, "refit_head": cfg.refit_head,
        "reports": reports,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CalibrateConfig, argv, prog="pneumo calibrate")
    try:
        run_calibrate(cfg)
    except (ConfigError, DataError, BundleError) as exc:
        print(f"pneumo calibrate: error: {exc}", file=sys.stderr)
        return 2
    return 0
