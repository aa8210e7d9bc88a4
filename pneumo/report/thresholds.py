"""Choosing the decision threshold on the positive score, on validation data (or a site's sample).

    t = choose_threshold(y_val, s_val, "target_sensitivity", target=0.95)        # a value
    record = threshold_record(labels, probs, classes, "target_sensitivity", 0.95)  # a bundle's threshold dict

Never on a test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumo.labels import is_positive, positive_score
from pneumo.report.metrics import as_binary, roc_curve

THRESHOLD_METHODS: tuple[str, ...] = ("youden", "target_sensitivity", "sensitivity_lower_bound")


def choose_threshold(y_true: Any, score: Any, method: str = "youden", target: float | None = None) -> float:
    """A decision threshold on the positive score (call `score >= t` positive).

    - `youden`: the threshold maximising sensitivity + specificity - 1 (the highest one on ties);
    - `target_sensitivity`: the highest threshold whose sensitivity on these data is >= `target`;
    - `sensitivity_lower_bound`: the highest threshold whose sensitivity's lower 95% confidence
      bound (Wilson, `scipy.stats.binomtest`) is >= `target`: the conservative choice on a small
      sample (a site's 50 labelled images), where the point estimate can reach the target by luck.

    Choose it on validation data, never on the test split.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method {method!r}; valid: {', '.join(THRESHOLD_METHODS)}")
    y, s = as_binary(y_true, score)
    if not y.any() or y.all():
        raise ValueError(f"choose_threshold needs both classes (got {int(y.sum())} positive of {y.size})")
    fpr, tpr, thr = roc_curve(y, s)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf point (nothing called positive)
    if method == "youden":
        j = tpr - fpr
        return float(thr[int(np.argmax(j >= j.max() - 1e-12))])  # first = highest among (near-)ties
    if target is None or not 0 < target <= 1:
        raise ValueError(f"{method} needs target in (0, 1], got {target!r}")
    if method == "target_sensitivity":
        return float(thr[int(np.argmax(tpr >= target - 1e-12))])
    from scipy.stats import binomtest

    n_pos = int(y.sum())
    for t, sens in zip(thr, tpr):  # descending thresholds: the first that is sure enough
        if binomtest(int(round(sens * n_pos)), n_pos).proportion_ci(0.95, "wilson").low >= target - 1e-12:
            return float(t)
    return float(thr[-1])  # even calling everything positive is not sure enough: the lowest threshold


def threshold_record(labels: Any, probs: Any, classes: Sequence[str], method: str = "youden",
                     target: float | None = None) -> dict[str, Any]:
    """A bundle's threshold dict (`value`, `method`, `target`), chosen by `choose_threshold` on
    class-index `labels` and probabilities `probs` [N, len(classes)] of validation data."""
    y, score = is_positive(labels, classes), positive_score(probs, classes)
    if method in ("target_sensitivity", "sensitivity_lower_bound"):
        value = choose_threshold(y, score, method=method, target=target)
        return {"value": float(value), "method": method, "target": float(target)}
    return {"value": float(choose_threshold(y, score, method=method)), "method": method, "target": None}
