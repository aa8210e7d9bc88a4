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


def apply_calibration(probs: np.ndarray, calibration: dict[str, Any]) -> np.ndarray:
    """The probabilities a folded `calibration` turns `probs` float[N, K] into (what the folded
    head would output), without a model: for cross-validation and for re-mapping stored scores."""
    eps = 1e-7
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    if calibration.get("method") == "platt":
        z = calibration["a"] * np.log(p[:, 1] / (1 - p[:, 1])) + calibration["c"]
        q = 1 / (1 + np.exp(-z))
        return np.stack([1 - q, q], axis=1).astype(np.float32)
    if calibration.get("method") == "temperature":
        z = np.log(p) / calibration["temperature"]
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    return p.astype(np.float32)


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


# ---------------------------------------------------------------- a site's own head

REFIT_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # L2 pull toward the current head, per image


def refit_head(features: np.ndarray, labels: np.ndarray, w0: np.ndarray, b0: float,
               strength: float) -> tuple[np.ndarray, float]:
    """A binary linear head refitted on a site's labelled features, pulled toward the current head:
    minimises the mean log-loss + `strength`/2 * ||w - w0||^2 (the intercept is free, so it also
    absorbs the site's prevalence). Written with scipy's L-BFGS because scikit-learn's logistic
    regression can only shrink toward zero, not toward a given head."""
    from scipy.optimize import minimize
    from scipy.special import expit

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w0 = np.asarray(w0, dtype=np.float64).ravel()
    n = len(y)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        loss = np.mean(np.maximum(z, 0) - y * z + np.log1p(np.exp(-np.abs(z)))) + strength / 2 * np.sum((w - w0) ** 2)
        r = (expit(z) - y) / n
        return float(loss), np.r_[x.T @ r + strength * (w - w0), r.sum()]

    theta = minimize(objective, np.r_[w0, b0], jac=True, method="L-BFGS-B", options={"maxiter": 500}).x
    return theta[:-1].astype(np.float32), float(theta[-1])


def choose_refit_strength(features: np.ndarray, labels: np.ndarray, groups: list[str], w0: np.ndarray,
                          b0: float, strengths: tuple[float, ...] = REFIT_STRENGTHS) -> tuple[float, dict[str, float]]:
    """The pull toward the current head with the best patient-grouped cross-validated log-loss on
    the site's sample (scikit-learn's StratifiedGroupKFold): (strength, {strength: CV log-loss})."""
    from scipy.special import expit
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    folds = max(2, min(5, int(np.bincount(y).min())))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    scores: dict[str, float] = {}
    for strength in strengths:
        held = np.zeros(len(y))
        for fit, test in cv.split(features, y, groups):
            w, b = refit_head(features[fit], y[fit], w0, b0, strength)
            held[test] = expit(features[test] @ w + b)
        scores[str(strength)] = float(log_loss(y, np.clip(held, 1e-7, 1 - 1e-7), labels=[0, 1]))
    best = min(scores, key=scores.get)
    return float(best), scores


def set_head(model: nn.Module, model_name: str, weight: np.ndarray, bias: Any) -> None:
    """Write a linear head's weights ([outputs, F] or [F] for one logit) and bias into the model."""
    import torch  # start-up time: see the TYPE_CHECKING note above

    head = model.get_submodule(get_spec(model_name).head)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(np.asarray(weight).reshape(head.weight.shape), dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float32).reshape(head.bias.shape),
                                        dtype=head.bias.dtype))


def head_weights(model: nn.Module, model_name: str) -> tuple[np.ndarray, float]:
    """A binary head's (weight float32[F], bias)."""
    head = model.get_submodule(get_spec(model_name).head)
    return head.weight.detach().cpu().numpy().reshape(-1).astype(np.float32), float(head.bias.detach().cpu()[0])


def head_matrix(model: nn.Module, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Any linear head's (weight float32[outputs, F], bias float32[outputs])."""
    head = model.get_submodule(get_spec(model_name).head)
    w = head.weight.detach().cpu().numpy().astype(np.float32)
    return w.reshape(w.shape[0], -1), head.bias.detach().cpu().numpy().astype(np.float32)
