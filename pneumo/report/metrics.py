"""Classification metrics in plain numpy: AUC, ROC/PR curves, thresholded metrics, bootstrap CIs,
calibration, and the three-class view (threshold choice: `pneumo.report.thresholds`).

Conventions (`pneumo.labels`, shared with the Predictor):

- `y_true` is 0/1 (1 = pneumonia) for the binary functions; `score` is the positive score,
  `1 - P(NORMAL)` (`pneumo.labels.positive_score`).
- A case is called positive when `score >= threshold` (`pneumo.labels.decide` calls NORMAL
  below the threshold).
- Undefined values (e.g. sensitivity with no positives) are `nan`, never an exception.

    auc = roc_auc(y, s)
    m = binary_metrics(y_test, s_test, t)        # auc, accuracy, sensitivity, ..., confusion
    ci = bootstrap_ci(y_test, s_test, t)         # {"auc": (lo, hi), ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumo.labels import decide, is_positive, negative_index, positive_score

CI_METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")

__all__ = [
    "CI_METRICS", "roc_auc", "roc_curve", "pr_curve", "average_precision",
    "confusion", "binary_metrics", "bootstrap_ci", "split_metrics", "calibration",
    "multiclass_metrics", "group_metrics",
]


def as_binary(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but score has {s.size}")
    if y.dtype != bool:
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            raise ValueError(f"y_true must be 0/1 (1 = positive); got values {np.unique(y[bad])[:5].tolist()}")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError(f"score has {int((~np.isfinite(s)).sum())} non-finite value(s)")
    return y, s


def _div(a: Any, b: Any) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(a, b)


# ---------------------------------------------------------------- ranking metrics


def roc_auc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve (`sklearn.metrics.roc_auc_score`; ties count one half).

    `nan` when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    y, s = as_binary(y_true, score)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def _sweep(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending over distinct scores, true positives, false positives at `score >= t`)."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]
    tps = np.cumsum(y_sorted)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1) - tps
    return s_sorted[last_of_group], tps, fps


def roc_curve(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; the first point is (0, 0) at `+inf`
    (`sklearn.metrics.roc_curve`, every distinct score kept).

    At `thresholds[i]`, calling `score >= thresholds[i]` positive gives `fpr[i]`, `tpr[i]`.
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, s = as_binary(y_true, score)
    if y.size == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    if y.all() or not y.any():  # sklearn warns and returns nan for the empty class; keep our own sweep
        thr, tps, fps = _sweep(y, s)
        return _div(np.r_[0.0, fps], (~y).sum()), _div(np.r_[0.0, tps], y.sum()), np.r_[np.inf, thr]
    fpr, tpr, thr = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def pr_curve(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), thresholds descending; the first point is (1, 0) at `+inf`."""
    y, s = as_binary(y_true, score)
    if y.size == 0:
        return np.ones(1), np.zeros(1), np.array([np.inf])
    thr, tps, fps = _sweep(y, s)
    precision = np.r_[1.0, _div(tps, tps + fps)]
    recall = _div(np.r_[0.0, tps], y.sum())
    return precision, recall, np.r_[np.inf, thr]


def average_precision(y_true: Any, score: Any) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, no interpolation
    (`sklearn.metrics.average_precision_score`); `nan` without positives."""
    from sklearn.metrics import average_precision_score

    y, s = as_binary(y_true, score)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, s))


# ---------------------------------------------------------------- thresholded metrics


def confusion(y_true: Any, score: Any, threshold: float) -> dict[str, int]:
    """{tn, fp, fn, tp} calling `score >= threshold` positive."""
    y, s = as_binary(y_true, score)
    pred = s >= threshold
    return {
        "tn": int((~y & ~pred).sum()), "fp": int((~y & pred).sum()),
        "fn": int((y & ~pred).sum()), "tp": int((y & pred).sum()),
    }


def _rates(tn: Any, fp: Any, fn: Any, tp: Any) -> dict[str, Any]:
    """Accuracy, sensitivity, ... from confusion counts (scalars or arrays alike)."""
    return {
        "accuracy": _div(tp + tn, tp + tn + fp + fn),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }


def binary_metrics(y_true: Any, score: Any, threshold: float) -> dict[str, Any]:
    """auc, average_precision, accuracy, sensitivity, specificity, ppv, npv, f1 at `threshold`,
    plus `confusion` {tn, fp, fn, tp}, `n`, `n_pos`, `n_neg` and the `threshold` itself."""
    y, s = as_binary(y_true, score)
    c = confusion(y, s, threshold)
    out: dict[str, Any] = {"auc": roc_auc(y, s), "average_precision": average_precision(y, s)}
    out.update({k: float(v) for k, v in _rates(**c).items()})
    out.update(confusion=c, n=int(y.size), n_pos=int(y.sum()), n_neg=int((~y).sum()), threshold=float(threshold))
    return out


# ---------------------------------------------------------------- bootstrap


def _resample_counts(rng: np.random.Generator, n_boot: int, groups: Sequence[np.ndarray], n_total: int) -> np.ndarray:
    """`n_boot` x `n_total` multiplicities: each group of indices resampled with replacement to its own size."""
    draws = np.concatenate(
        [g[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups if len(g)], axis=1
    )
    flat = draws + (np.arange(n_boot, dtype=np.int64) * n_total)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_total).reshape(n_boot, n_total).astype(np.float64)


def _weighted_stats(w: np.ndarray, y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Metrics of each bootstrap replicate, given its multiplicities `w` [B, N] over the sample."""
    order = np.argsort(s, kind="mergesort")  # ascending; ties become contiguous groups
    w, y, s = w[:, order], y[order], s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    w_pos = np.add.reduceat(w * y, starts, axis=1)  # [B, groups]
    w_neg = np.add.reduceat(w * ~y, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    auc = _div((w_pos * (neg_below + 0.5 * w_neg)).sum(axis=1), n_pos * n_neg)
    pred = s >= threshold
    tp, fn = w @ (y & pred), w @ (y & ~pred)
    fp, tn = w @ (~y & pred), w @ (~y & ~pred)
    return {"auc": auc, **_rates(tn, fp, fn, tp)}


def bootstrap_ci(
    y_true: Any,
    score: Any,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
    metrics: Sequence[str] = CI_METRICS,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap `(1 - alpha)` intervals: {metric: (lo, hi)} for `metrics`.

    `stratified` resamples positives and negatives separately (keeping their counts), so every
    replicate has both classes. Vectorised: replicates are multiplicity matrices, no Python loop
    over samples. Undefined replicates (e.g. ppv with no predicted positives) are left out; a
    metric undefined in every replicate gets `(nan, nan)`.
    """
    unknown = [m for m in metrics if m not in CI_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(CI_METRICS)}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1 (alpha={alpha}, n_boot={n_boot})")
    y, s = as_binary(y_true, score)
    n = y.size
    if n == 0:
        return {m: (float("nan"), float("nan")) for m in metrics}
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y), np.flatnonzero(~y)] if stratified else [np.arange(n)]
    chunk = max(1, min(n_boot, 8_000_000 // n))  # bound memory at ~64 MB per matrix
    reps: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        w = _resample_counts(rng, b, groups, n)
        stats = _weighted_stats(w, y, s, threshold)
        for m in metrics:
            reps[m].append(stats[m])
        done += b
    out = {}
    for m in metrics:
        values = np.concatenate(reps[m])
        values = values[np.isfinite(values)]
        if values.size == 0:
            out[m] = (float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            out[m] = (float(lo), float(hi))
    return out


def split_metrics(labels: Any, probs: Any, classes: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy, sensitivity and specificity of the positive score at `threshold` (and the class
    accuracy for k > 2 classes) from class-index `labels` and probabilities `probs` [N, len(classes)]:
    a training epoch's val row and a bundle's `metrics`."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    m = binary_metrics(is_positive(labels, classes), positive_score(probs, classes), threshold)
    out = {k: float(m[k]) for k in ("auc", "accuracy", "sensitivity", "specificity") if m.get(k) is not None}
    if len(classes) > 2 and len(labels):
        out["class_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
    return out


# ---------------------------------------------------------------- calibration


def calibration(y_true: Any, score: Any, n_bins: int = 10) -> dict[str, Any]:
    """Reliability table over `n_bins` equal-width bins of [0, 1].

    Returns `edges` (n_bins + 1), per bin `mean_predicted`, `observed` (positive frequency) and
    `counts` (empty bins: nan, nan, 0), the expected calibration error `ece` (count-weighted mean
    |observed - mean_predicted|), the maximum one `mce`, and the `brier` score.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins}: need at least 1")
    y, s = as_binary(y_true, score)
    if ((s < 0) | (s > 1)).any():
        raise ValueError("calibration needs probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip((s * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    mean_pred = _div(np.bincount(bins, weights=s, minlength=n_bins), counts)
    observed = _div(np.bincount(bins, weights=y.astype(np.float64), minlength=n_bins), counts)
    gap = np.abs(observed - mean_pred)
    filled = counts > 0
    n = max(1, y.size)
    return {
        "edges": edges.tolist(),
        "mean_predicted": mean_pred.tolist(),
        "observed": observed.tolist(),
        "counts": counts.astype(int).tolist(),
        "ece": float((counts[filled] * gap[filled]).sum() / n) if y.size else float("nan"),
        "mce": float(gap[filled].max()) if filled.any() else float("nan"),
        "brier": float(np.mean((s - y) ** 2)) if y.size else float("nan"),
    }


# ---------------------------------------------------------------- multiclass


def multiclass_metrics(
    y_true_idx: Any, probs: Any, classes: Sequence[str], threshold: float | None = None
) -> dict[str, Any]:
    """Metrics of a k-class prediction (k >= 2); `y_true_idx` are indices into `classes`.

    Predicted labels follow `pneumo.labels.decide` at `threshold` (NORMAL when
    1 - P(NORMAL) < threshold, else the likeliest other class); without a threshold, argmax.
    Returns `accuracy`, `confusion_matrix` (rows true, columns predicted, in `classes` order),
    per-class `per_class` {auc (one-vs-rest), recall, precision, support}, `macro_auc`, and
    `binary`: `binary_metrics` of pneumonia (any non-NORMAL class) vs NORMAL on the positive score.
    """
    classes = list(classes)
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true_idx).reshape(-1).astype(np.int64)
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (y.size, k):
        raise ValueError(f"probs must be [{y.size}, {k}] for classes {classes}, got {probs.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"y_true_idx must index into {classes}; got values outside 0..{k - 1}")
    neg = negative_index(classes)
    if threshold is None:
        pred = probs.argmax(axis=1)
    else:
        pred = np.array([classes.index(c) for c in decide(probs, classes, threshold)], dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        per_class[name] = {
            "auc": roc_auc(y == i, probs[:, i]),
            "recall": float(_div(cm[i, i], cm[i].sum())),
            "precision": float(_div(cm[i, i], cm[:, i].sum())),
            "support": int(cm[i].sum()),
        }
    aucs = [v["auc"] for v in per_class.values() if np.isfinite(v["auc"])]
    return {
        "classes": classes,
        "accuracy": float(_div(np.trace(cm), cm.sum())),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "binary": binary_metrics(y != neg, 1.0 - probs[:, neg], 0.5 if threshold is None else threshold),
        "n": int(y.size),
    }


# ---------------------------------------------------------------- per-group


def group_metrics(y_true: Any, score: Any, groups: Sequence[str], threshold: float) -> dict[str, Any]:
    """Metrics per group (e.g. acquisition series) at `threshold`, and the worst group beside the mean.

    A group of negatives only (a NORMAL series) gets its specificity, a group of positives only
    its sensitivity, and only a group holding both classes an AUC (`auc` None otherwise: an AUC
    needs both classes; report.md writes "n/a: one class"). `worst` is the lowest of
    each metric over the groups that have it; `mean` their unweighted mean.
    """
    y, s = as_binary(y_true, score)
    g = np.asarray(list(groups), dtype=object)
    out: dict[str, Any] = {}
    for name in sorted(set(g.tolist())):
        mask = g == name
        yg, sg = y[mask], s[mask]
        row: dict[str, Any] = {"n": int(mask.sum()), "positives": int(yg.sum())}
        if (~yg).any():
            row["specificity"] = float(np.mean(sg[~yg] < threshold))
        if yg.any():
            row["sensitivity"] = float(np.mean(sg[yg] >= threshold))
        row["auc"] = roc_auc(yg, sg) if yg.any() and (~yg).any() else None  # None: one class only
        out[name] = row
    summary: dict[str, Any] = {"worst": {}, "mean": {}}
    for key in ("auc", "sensitivity", "specificity"):
        values = {k: v[key] for k, v in out.items() if v.get(key) is not None and np.isfinite(v[key])}
        if values:
            worst = min(values, key=values.get)
            summary["worst"][key] = {"group": worst, "value": values[worst]}
            summary["mean"][key] = float(np.mean(list(values.values())))
    return {"groups": out, **summary}
