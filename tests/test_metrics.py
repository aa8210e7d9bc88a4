"""pneumo.metrics against hand-computed tables and independent definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pneumo.report import metrics as M
from pneumo.report.thresholds import choose_threshold


def mann_whitney_auc(y, s) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), by brute force over all pairs."""
    y, s = np.asarray(y, bool), np.asarray(s, float)
    pos, neg = s[y][:, None], s[~y][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.mark.parametrize(
    ("y", "s", "auc"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfect
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),  # inverted
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all tied
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # one discordant pair of four
        ([0, 1, 1], [0.3, 0.3, 0.9], 0.75),  # one tie (half) + one win, over 2 pairs
        ([0, 0, 0, 1], [0.2, 0.6, 0.6, 0.6], 2 / 3),  # ties with two negatives
    ],
)
def test_roc_auc_hand_table(y, s, auc):
    assert M.roc_auc(y, s) == pytest.approx(auc)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.7 + 0.3 * y, 1)  # coarse rounding -> many ties
    assert M.roc_auc(y, s) == pytest.approx(mann_whitney_auc(y, s), abs=1e-12)


def test_roc_auc_one_class_is_nan_and_bad_labels_raise():
    assert math.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0/1"):
        M.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        M.roc_auc([0, 1], [0.1, float("nan")])


def test_roc_curve_points_and_trapezoid_area():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    fpr, tpr, thr = M.roc_curve(y, s)
    assert thr.tolist() == [np.inf, 0.8, 0.4, 0.35, 0.1]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(y, s))


def test_pr_curve_and_average_precision_hand_table():
    # sorted by score: 1 (0.9), 0 (0.8), 1 (0.7), 0 (0.6)
    y, s = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]
    precision, recall, thr = M.pr_curve(y, s)
    assert recall.tolist() == [0, 0.5, 0.5, 1, 1]
    assert precision == pytest.approx([1, 1, 0.5, 2 / 3, 0.5])
    assert M.average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert M.average_precision([0, 1], [0.1, 0.9]) == pytest.approx(1.0)


def test_binary_metrics_known_confusion():
    # threshold 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.4), fp=1 (0.7), tn=5
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1, 0.1, 0.0]
    m = M.binary_metrics(y, s, 0.5)
    assert m["confusion"] == {"tn": 5, "fp": 1, "fn": 1, "tp": 3}
    assert (m["n"], m["n_pos"], m["n_neg"]) == (10, 4, 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(0.75)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(mann_whitney_auc(y, s))


def test_threshold_is_inclusive_like_predict_decide():
    m = M.binary_metrics([0, 1], [0.5, 0.5], 0.5)
    assert m["confusion"] == {"tn": 0, "fp": 1, "fn": 0, "tp": 1}


def test_binary_metrics_undefined_rates_are_nan():
    m = M.binary_metrics([1, 1], [0.2, 0.9], 0.5)
    assert math.isnan(m["specificity"]) and math.isnan(m["auc"])
    assert m["sensitivity"] == 0.5


# ---------------------------------------------------------------- bootstrap


def _noisy(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (y - 0.5))))
    return y, s


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_ci_contains_point_estimate(stratified):
    y, s = _noisy(400)
    point = M.binary_metrics(y, s, 0.5)
    ci = M.bootstrap_ci(y, s, 0.5, n_boot=500, seed=1, stratified=stratified)
    assert set(ci) == set(M.CI_METRICS)
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi, name
        assert 0 <= lo < hi <= 1, name


def test_bootstrap_ci_narrows_with_more_data_and_is_seeded():
    small = M.bootstrap_ci(*_noisy(100), 0.5, n_boot=400)
    large = M.bootstrap_ci(*_noisy(2000), 0.5, n_boot=400)
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        assert large[name][1] - large[name][0] < 0.6 * (small[name][1] - small[name][0]), name
    y, s = _noisy(200)
    assert M.bootstrap_ci(y, s, 0.5, seed=3, n_boot=200) == M.bootstrap_ci(y, s, 0.5, seed=3, n_boot=200)


def test_bootstrap_auc_replicates_match_direct_computation():
    """The vectorised weighted AUC of one replicate equals roc_auc on the materialised resample."""
    y, s = _noisy(60, seed=4)
    s = np.round(s, 1)  # ties
    y = y.astype(bool)
    rng = np.random.default_rng(0)
    w = M._resample_counts(rng, 5, [np.flatnonzero(y), np.flatnonzero(~y)], y.size)
    stats = M._weighted_stats(w, y, s, 0.5)
    for b in range(5):
        idx = np.repeat(np.arange(y.size), w[b].astype(int))
        assert stats["auc"][b] == pytest.approx(M.roc_auc(y[idx], s[idx]))
        assert stats["sensitivity"][b] == pytest.approx(M.binary_metrics(y[idx], s[idx], 0.5)["sensitivity"])


def test_bootstrap_ci_rejects_unknown_metric():
    with pytest.raises(ValueError, match="valid: auc"):
        M.bootstrap_ci([0, 1], [0.1, 0.9], 0.5, metrics=["kappa"])


# ---------------------------------------------------------------- thresholds


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_target_sensitivity_is_met_and_is_the_highest_such_threshold(target):
    y, s = _noisy(300, seed=2)
    t = choose_threshold(y, s, "target_sensitivity", target=target)
    assert M.binary_metrics(y, s, t)["sensitivity"] >= target
    higher = s[s > t]
    if higher.size:  # the next score above t no longer reaches the target
        assert M.binary_metrics(y, s, higher.min())["sensitivity"] < target


def test_youden_hand_table_and_maximality():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.7, 0.4, 0.8, 0.9]
    # t=0.8: sens 2/3, spec 1 -> J 2/3;  t=0.4: sens 1, spec 2/3 -> J 2/3 (tie: highest wins)
    assert choose_threshold(y, s, "youden") == pytest.approx(0.8)
    y2, s2 = _noisy(300, seed=5)
    t = choose_threshold(y2, s2)
    m = M.binary_metrics(y2, s2, t)
    best = max(M.binary_metrics(y2, s2, c)["sensitivity"] + M.binary_metrics(y2, s2, c)["specificity"]
               for c in np.unique(s2))
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "otsu"}, "valid: youden, target_sensitivity"),
        ({"method": "target_sensitivity"}, "target"),
        ({"method": "target_sensitivity", "target": 1.5}, "target"),
    ],
)
def test_choose_threshold_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_threshold([0, 1], [0.2, 0.8], **kwargs)


def test_calibration_perfect_vs_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = rng.random(20000) < p  # outcomes drawn with the predicted probability
    good = M.calibration(y, p)
    over = M.calibration(y, np.where(p > 0.5, 1.0, 0.0) * 0.98 + 0.01)  # pushes to 0.01 / 0.99
    assert good["ece"] < 0.02
    assert over["ece"] > 0.2
    assert len(good["edges"]) == 11 and sum(good["counts"]) == 20000


def test_calibration_hand_table():
    cal = M.calibration([0, 1, 1, 1], [0.05, 0.15, 0.95, 1.0], n_bins=2)
    assert cal["counts"] == [2, 2]
    assert cal["mean_predicted"] == pytest.approx([0.1, 0.975])
    assert cal["observed"] == pytest.approx([0.5, 1.0])
    assert cal["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.025)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.calibration([0, 1], [0.5, 1.5])


# ---------------------------------------------------------------- multiclass


def test_multiclass_metrics_three_class():
    classes = ["NORMAL", "BACTERIA", "VIRUS"]
    probs = np.array([
        [0.8, 0.1, 0.1],  # NORMAL -> NORMAL
        [0.6, 0.3, 0.1],  # NORMAL -> NORMAL
        [0.1, 0.7, 0.2],  # BACTERIA -> BACTERIA
        [0.2, 0.3, 0.5],  # BACTERIA -> VIRUS
        [0.1, 0.2, 0.7],  # VIRUS -> VIRUS
        [0.55, 0.2, 0.25],  # VIRUS -> NORMAL at argmax; VIRUS at threshold 0.42 (1 - 0.55 >= 0.42)
    ])
    y = [0, 0, 1, 1, 2, 2]
    m = M.multiclass_metrics(y, probs, classes)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["VIRUS"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["NORMAL"]["auc"] == pytest.approx(mann_whitney_auc(np.array(y) == 0, probs[:, 0]))
    assert m["binary"]["n_pos"] == 4
    decided = M.multiclass_metrics(y, probs, classes, threshold=0.42)
    assert decided["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert decided["binary"]["confusion"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 4}


def test_positive_score_uses_normal_column_wherever_it_is():
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert M.positive_score(probs, ["PNEUMONIA", "NORMAL"]).tolist() == pytest.approx([0.2, 0.9])
    assert M.positive_score(probs, ["NORMAL", "PNEUMONIA"]).tolist() == pytest.approx([0.8, 0.1])
    with pytest.raises(ValueError, match="probs must be"):
        M.positive_score(probs, ["NORMAL", "BACTERIA", "VIRUS"])


def test_group_metrics_report_the_worst_series() -> None:
    #            NORMAL IM (good) | NORMAL2 (bad)  | bacteria       | virus
    y = np.array([0, 0, 0, 0,       0, 0, 0, 0,      1, 1, 1, 1,      1, 1, 1, 1])
    s = np.array([.1, .2, .1, .3,   .6, .7, .2, .1,  .9, .8, .9, .7,  .6, .4, .9, .8])
    groups = ["IM series"] * 4 + ["NORMAL2-IM series"] * 4 + ["bacteria"] * 4 + ["virus"] * 4
    g = M.group_metrics(y, s, groups, threshold=0.5)
    assert g["groups"]["IM series"]["specificity"] == 1.0
    assert g["groups"]["NORMAL2-IM series"]["specificity"] == 0.5
    assert g["groups"]["virus"]["sensitivity"] == 0.75 and g["groups"]["bacteria"]["sensitivity"] == 1.0
    assert g["worst"]["specificity"] == {"group": "NORMAL2-IM series", "value": 0.5}
    assert g["worst"]["sensitivity"]["group"] == "virus"
    assert all(row["auc"] is None for row in g["groups"].values())  # one class per group: no AUC
    assert "auc" not in g["worst"]
    assert g["mean"]["specificity"] == 0.75


@pytest.mark.parametrize("name, group", [
    ("IM-0115-0001.jpeg", "IM series"), ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM series"),
    ("person1430_bacteria_3695.jpeg", "bacteria"), ("person5_virus_11.jpeg", "virus"), ("scan.png", "other"),
])
def test_acquisition_group(name: str, group: str) -> None:
    from pneumo.data.datasets import acquisition_group

    assert acquisition_group(f"/x/NORMAL/{name}") == group
