"""Drift over serving traffic: a sliding window of the last served images against the bundle's
`pneumo.monitor.drift.DriftReference`, judged with the same tests as a scoring run (`compare`).

    window = DriftWindow(reference, size=500, every_s=60)
    window.add(features, scores)        # per served batch, thread-safe
    window.snapshot()                   # {"window", "added", "computed_at", "gauges", **DriftReport}

`snapshot()` recomputes lazily (at most every `every_s` seconds or after `every_n` new images);
its `gauges` are the flat numbers `pneumo.serve.app` exports to Prometheus.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from pneumo.monitor.drift import DriftReference, DriftReport, compare


class DriftWindow:
    """The last `size` served images against the reference; `snapshot()` recomputes at most every
    `every_s` seconds or after `every_n` new images (default: a whole new window), else returns the last."""

    def __init__(self, reference: DriftReference, size: int = 500, every_s: float = 60.0, every_n: int | None = None,
                 alpha: float = 0.05, permutations: int = 100) -> None:
        self.reference, self.size, self.every_s = reference, size, every_s
        self.every_n, self.alpha, self.permutations = every_n or size, alpha, permutations
        self._z: deque[np.ndarray] = deque(maxlen=size)
        self._s: deque[float] = deque(maxlen=size)
        self._lock, self._compute = threading.Lock(), threading.Lock()
        self._added = self._new = 0
        self._last_t = -math.inf
        self._last: dict[str, Any] = {}

    def add(self, features: np.ndarray | None, scores: np.ndarray) -> None:
        s = np.asarray(scores, dtype=np.float32).ravel()
        z = None if features is None else self.reference.project(np.atleast_2d(features))
        with self._lock:
            if z is None:
                self._z.clear()  # scores only from now on: the window keeps rows aligned
            else:
                self._z.extend(z)
            self._s.extend(s.tolist())
            self._added += len(s)
            self._new += len(s)

    def snapshot(self) -> dict[str, Any]:
        """`{"window": n, "added": total, "computed_at": unix, "gauges": {...}, **report.to_dict()}`."""
        with self._compute:
            with self._lock:
                due = self._new > 0 and (not self._last or self._new >= self.every_n
                                         or time.monotonic() - self._last_t >= self.every_s)
                if not due:
                    return dict(self._last) or self._empty()
                s = np.array(self._s, dtype=np.float32)
                z = np.stack(self._z) if len(self._z) == len(self._s) and len(self._z) else None
                self._new, self._last_t, added = 0, time.monotonic(), self._added
            report = compare(self.reference, z, s, alpha=self.alpha, permutations=self.permutations,
                             max_run=self.size, projected=True)
            snap = {"window": len(s), "added": added, "computed_at": time.time(), **report.to_dict()}
            snap["gauges"] = _gauges(report, len(s))
            with self._lock:
                self._last = snap
            return dict(snap)

    def _empty(self) -> dict[str, Any]:
        report = DriftReport(False, "too_few", 0, self.reference.n, self.alpha, None,
                             self.reference.positive_rate, self.reference.threshold)
        return {"window": 0, "added": 0, "computed_at": None, **report.to_dict(), "gauges": _gauges(report, 0)}


def _gauges(report: DriftReport, window: int) -> dict[str, float]:
    """Flat numbers for Prometheus (NaN where a test did not run)."""
    g = {"drift_shift": float(report.shift), "drift_window_images": float(window),
         "drift_positive_rate": float("nan") if report.positive_rate is None else report.positive_rate,
         "drift_reference_positive_rate": report.reference_positive_rate}
    for name in ("mmd", "ks", "positive_rate"):
        g[f"drift_{name}_p_value"] = report.tests.get(name, {}).get("p_value", float("nan"))
    return g
