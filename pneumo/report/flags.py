"""Red flags: the plain words that a model is no good as it stands, from one split's figures.

    flags = red_flags(report)      # report: write_report's dict, or `pneumo.report.writer.figures` + split

Read by report.md's top block, the train and evaluate console summaries, `summary.json`, the
bundle manifest (`training.red_flags`, so serving's model info and web page show them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIN_AUC = 0.7
CHANCE_AUC = 0.5
EDGE_THRESHOLD = 0.01  # a threshold below this or above 1 - this sits at the edge of the scores
MAX_CI_HALF_WIDTH = 0.1
CI_KEYS = ("auc", "sensitivity", "specificity")


def format_threshold(value: float) -> str:
    """A threshold with its significant digits (2.35e-05, not 0.0000; 0.5 as 0.5)."""
    return f"{float(value):.4g}"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _threshold_value(threshold: Any) -> float | None:
    value = threshold.get("value") if isinstance(threshold, Mapping) else threshold
    return float(value) if _finite(value) else None


def _auc_flags(split: str, auc: Any) -> list[str]:
    if not _finite(auc):
        return [f"{split} AUC undefined: the {split} split holds one class only"]
    if auc < CHANCE_AUC:
        return [f"{split} AUC {auc:.3f} is below chance ({CHANCE_AUC}): the model ranks cases backwards"]
    if auc < MIN_AUC:
        return [f"{split} AUC {auc:.3f} is below {MIN_AUC}: the model barely tells pneumonia from normal"]
    return []


def _wilson(successes: int, n: int) -> tuple[float, float] | None:
    """The 95% Wilson interval of a proportion (`scipy.stats.binomtest`); None for n = 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(0.95, "wilson")
    return float(ci.low), float(ci.high)


def _intervals(report: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Each key's intervals: the report's bootstrap CI and, for sensitivity and specificity, the
    Wilson interval of the counts too (a percentile bootstrap collapses to [1, 1] at 8 of 8 found)."""
    ci, c = report.get("ci") or {}, report.get("confusion") or {}
    out: dict[str, list[tuple[float, float]]] = {k: [tuple(ci[k])] for k in CI_KEYS if ci.get(k)}
    for key, hit, miss in (("sensitivity", "tp", "fn"), ("specificity", "tn", "fp")):
        wilson = _wilson(c.get(hit, 0), c.get(hit, 0) + c.get(miss, 0))
        if wilson:
            out.setdefault(key, []).append(wilson)
    return out


def _ci_flag(split: str, report: Mapping[str, Any]) -> list[str]:
    """Too few images for a CI narrower than +-0.1 on AUC, sensitivity or specificity."""
    widest = None
    for key, intervals in _intervals(report).items():
        for lo_hi in intervals:
            if _finite(lo_hi[0]) and _finite(lo_hi[1]):
                half = (lo_hi[1] - lo_hi[0]) / 2
                if half > MAX_CI_HALF_WIDTH and (widest is None or half > widest[1]):
                    widest = (key, half, lo_hi)
    if widest is None:
        return []
    key, half, (lo, hi) = widest
    c = report.get("confusion") or {}
    pos, neg = c.get("tp", 0) + c.get("fn", 0), c.get("tn", 0) + c.get("fp", 0)
    return [f"too few {split} images ({report.get('n', pos + neg)}: {pos} pneumonia, {neg} normal) for a 95% CI "
            f"narrower than ±{MAX_CI_HALF_WIDTH}: {key} CI {lo:.2f}-{hi:.2f} (±{half:.2f})"]


def red_flags(report: Mapping[str, Any]) -> list[str]:
    """What says this split's model is no good: AUC below 0.7 or below chance, a sensitivity or
    specificity of 0, every prediction one class, a threshold at the edge (< 0.01 or > 0.99), and
    too few images for a 95% CI narrower than ±0.1. `report` holds `metrics` (auc, sensitivity,
    specificity), `confusion` (tp, fn, fp, tn), `ci` and `threshold`; [] when nothing is wrong."""
    split = str(report.get("split") or "val")
    m, c = report.get("metrics") or {}, report.get("confusion") or {}
    n = sum(int(c.get(k, 0)) for k in ("tp", "fn", "fp", "tn"))
    if n == 0:
        return [f"no {split} images: nothing says this model works"]
    flags = _auc_flags(split, m.get("auc"))
    for key, what in (("sensitivity", "no pneumonia case is found"), ("specificity", "every normal image is "
                                                                                     "called pneumonia")):
        if _finite(m.get(key)) and m[key] == 0:
            flags.append(f"{split} {key} is 0: {what} at the threshold")
    called = int(c.get("tp", 0)) + int(c.get("fp", 0))
    if called in (0, n):
        flags.append(f"every {split} image is predicted {'NORMAL' if called == 0 else 'pneumonia'}")
    t = _threshold_value(report.get("threshold"))
    if t is not None and not EDGE_THRESHOLD <= t <= 1 - EDGE_THRESHOLD:
        flags.append(f"threshold {format_threshold(t)} is at the edge (below {EDGE_THRESHOLD} or above "
                     f"{1 - EDGE_THRESHOLD}): the scores hardly separate the classes")
    return flags + _ci_flag(split, report)


def flags_markdown(flags: list[str]) -> list[str]:
    """report.md's top block: empty when nothing is wrong."""
    if not flags:
        return []
    return ["> **Red flags: this model is no good as it stands.**", ">",
            *[f"> - {f}" for f in flags], ""]


def flags_lines(flags: list[str], indent: str = "  ") -> list[str]:
    """The console's red-flag lines (none when nothing is wrong)."""
    if not flags:
        return []
    return [f"{indent}RED FLAGS ({len(flags)}): this model is no good as it stands",
            *[f"{indent}  - {f}" for f in flags]]
