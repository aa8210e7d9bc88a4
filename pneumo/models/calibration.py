"""Calibration of a model's probabilities: Platt scaling (binary) or temperature scaling (k classes)
fitted on labelled predictions (training's val split, or a site's labelled sample), then folded
into the classifier's weights so every engine outputs calibrated probabilities with no extra step.

    cal = fit_calibration("platt", labels, probs, classes)     # {"method": "platt", "a", "c", ...}
    fold_calibration(model, "efficientnet_lite0", cal)         # AUC unchanged: a > 0 keeps the ranking
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pneumo.models.zoo import get_spec

if TYPE_CHECKING:  # torch only where weights are folded: train/score configs list CALIBRATIONS without it
    from torch import nn

CALIBRATIONS = ("none", "platt", "temperature")


def fit_calibration(method: str, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Platt scaling (binary: a * logit + c, scikit-learn's logistic regression on the val logit) or
    temperature scaling (k classes: logits / T, by minimising the val log-loss with scipy)."""
    from scipy.optimize import minimize_scalar
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels)
    eps = 1e-7
    if method == "platt":
        if len(classes) != 2:
            raise ValueError("platt calibration is for binary bundles; use temperature")
        p = np.clip(probs[:, 1], eps, 1 - eps)
        logit = np.log(p / (1 - p)).reshape(-1, 1)
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(logit, y)
        return {"method": "platt", "a": float(lr.coef_[0, 0]), "c": float(lr.intercept_[0]), "fitted_on": "val",
                "n": int(len(y)), "prevalence": float(np.mean(y != 0))}
    logp = np.log(np.clip(probs, eps, 1.0))  # softmax logits up to a per-row constant

    def nll(t: float) -> float:
        z = logp / t
        z = z - z.max(axis=1, keepdims=True)
        return float(-np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))))

    t = float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)
    return {"method": "temperature", "temperature": t, "fitted_on": "val", "n": int(len(y)),
            "prevalence": float(np.mean(y != 0))}


def fold_calibration(model: nn.Module, model_name: str, calibration: dict[str, Any]) -> None:
    """Fold the fitted scaling into the classifier's weights: every engine then outputs calibrated
    probabilities with no extra step (a > 0 and T > 0 keep the ranking, so AUC is unchanged)."""
    import torch  # start-up time: see the TYPE_CHECKING note above

    head = model.get_submodule(get_spec(model_name).head)
    with torch.no_grad():
        if calibration["method"] == "platt":
            head.weight.mul_(calibration["a"])
            head.bias.mul_(calibration["a"]).add_(calibration["c"])
        else:
            head.weight.div_(calibration["temperature"])
            head.bias.div_(calibration["temperature"])
