"""Label shift: the class priors of an unlabelled run, by the EM of Saerens, Latinne &
Decaestecker (2002), and posteriors re-weighted to them (`pneumo score --adapt --adapt-methods em`)."""

from __future__ import annotations

import numpy as np


def estimate_prevalence_em(posteriors: np.ndarray, train_prior: float | np.ndarray, tol: float = 1e-6,
                           max_iter: int = 1000) -> tuple[float | np.ndarray, np.ndarray]:
    """Label-shift EM of Saerens, Latinne & Decaestecker (2002): the run's class priors and the
    posteriors re-weighted to them. `posteriors`: float[N] (positive class) or float[N, K]."""
    # Written by hand: no maintained library implements this EM (it is ~10 lines).
    p = np.asarray(posteriors, dtype=np.float64)
    binary = p.ndim == 1
    p = np.clip(np.stack([1 - p, p], axis=1) if binary else p, 1e-12, 1.0)
    train = np.atleast_1d(np.asarray(train_prior, dtype=np.float64))
    train = np.array([1 - train[0], train[0]]) if binary else train
    if len(p) == 0:
        return (float(train[1]) if binary else train), np.asarray(posteriors, dtype=np.float64)
    prior, adjusted = train.copy(), p
    for _ in range(max_iter):
        w = p * (prior / train)
        adjusted = w / w.sum(axis=1, keepdims=True)
        new = adjusted.mean(axis=0)
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    return (float(prior[1]), adjusted[:, 1]) if binary else (prior, adjusted)
