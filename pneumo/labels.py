"""The class-label rule, in one place: label sets, the negative class, the positive score, decisions.

    negative_index(["NORMAL", "PNEUMONIA"])          -> 0
    positive_score(probs, classes)                   -> 1 - P(NORMAL), float64[N]
    decide(probs, classes, threshold)                -> ["NORMAL", "PNEUMONIA", ...]
    is_positive(label_indices, classes)              -> 1 for any class but NORMAL

A case is called positive (pneumonia) when `positive_score >= threshold`; below it the label is
NORMAL, above it the likeliest other class (BACTERIA or VIRUS for three-class bundles). Metrics,
the Predictor, batch scoring, serving and adaptation all use these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "binary": ("NORMAL", "PNEUMONIA"),
    "three_class": ("NORMAL", "BACTERIA", "VIRUS"),
}
NEGATIVE = "NORMAL"


def negative_index(classes: Sequence[str]) -> int:
    """Index of NORMAL in `classes` (0 when absent)."""
    return list(classes).index(NEGATIVE) if NEGATIVE in classes else 0


def positive_score(probs: Any, classes: Sequence[str]) -> np.ndarray:
    """The pneumonia score `1 - P(NORMAL)` from `probs` float[N, len(classes)]."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be [N, {len(classes)}] for classes {list(classes)}, got {probs.shape}")
    return 1.0 - probs[:, negative_index(classes)]


def is_positive(labels: Any, classes: Sequence[str]) -> np.ndarray:
    """1 for any class but NORMAL (the question the threshold answers), else 0, from class indices."""
    return (np.asarray(labels) != negative_index(classes)).astype(np.int64)


def decide(probs: Any, classes: Sequence[str], threshold: float) -> list[str]:
    """Labels: NORMAL below the threshold on the positive score, else the likeliest other class."""
    classes = list(classes)
    probs = np.asarray(probs, dtype=np.float64)
    neg = negative_index(classes)
    positive = positive_score(probs, classes)
    others = probs.copy()
    others[:, neg] = -1.0
    best = others.argmax(axis=1)
    return [classes[neg] if pos < threshold else classes[b] for pos, b in zip(positive, best)]
