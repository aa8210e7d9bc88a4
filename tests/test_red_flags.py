"""Reports that say when a model is no good: red flags in report.md, report.json and the console,
thresholds printed with their digits, per-group AUC only for groups with both classes, and one
best epoch on every panel of the training curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumo.report.flags import format_threshold, red_flags
from pneumo.report.plots import training_figure
from pneumo.report.writer import summary_table, write_report

CLASSES = ["NORMAL", "PNEUMONIA"]


def _scores(n: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half NORMAL, half PNEUMONIA; the positive score is the label plus noise, pulled apart by `separation`."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int64)
    score = np.clip(0.5 + separation * (y - 0.5) + rng.normal(0, 0.12, n), 0.001, 0.999)
    return y, score


def _probs(score: np.ndarray) -> np.ndarray:
    return np.c_[1 - score, score]  # NORMAL first: the positive score is 1 - P(NORMAL)


# name: (labels and scores, threshold, words the flags must hold; [] = a good model, no flag)
CASES = {
    "good": (lambda: _scores(400, 0.6), 0.5, []),
    "weak": (lambda: _scores(400, 0.06), 0.5, ["is below 0.7"]),
    "random": (lambda: (_scores(400, 0.0)[0], np.random.default_rng(1).random(400)), 0.5, ["AUC 0.455 is below"]),
    "backwards": (lambda: (_scores(400, 0.6)[0], 1 - _scores(400, 0.6)[1]), 0.5, ["below chance"]),
    "all_pneumonia": (lambda: (_scores(400, 0.6)[0], np.full(400, 0.9)), 0.5,
                      ["specificity is 0", "every val image is predicted pneumonia", "AUC 0.500"]),
    "all_normal": (lambda: (_scores(400, 0.6)[0], np.full(400, 0.1)), 0.5,
                   ["sensitivity is 0", "every val image is predicted NORMAL"]),
    "edge_threshold": (lambda: _scores(400, 0.6), 2.35e-05, ["threshold 2.35e-05 is at the edge"]),
    "few_images": (lambda: _scores(16, 0.6), 0.5, ["too few val images (16: 8 pneumonia, 8 normal)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_report_red_flags(case: str, tmp_path: Path) -> None:
    make, threshold, words = CASES[case]
    y, score = make()
    report = write_report(tmp_path, y, _probs(score), CLASSES, {"value": threshold, "method": "youden"}, "val",
                          n_boot=300)
    flags = report["red_flags"]
    md = (tmp_path / "report.md").read_text()
    console = summary_table(report)
    assert json.loads((tmp_path / "report.json").read_text())["red_flags"] == flags
    if not words:
        assert flags == [], flags
        assert "Red flags" not in md and "RED FLAGS" not in console
        return
    for word in words:
        assert any(word in f for f in flags), (word, flags)
    head = md.split("## Metrics")[0]  # the block sits at the top, before any figure
    assert "Red flags: this model is no good" in head and all(f in head for f in flags)
    assert f"RED FLAGS ({len(flags)})" in console and all(f in console for f in flags)


def test_red_flags_on_empty_split() -> None:
    assert red_flags({"split": "test", "metrics": {}, "confusion": {}}) == [
        "no test images: nothing says this model works"]


@pytest.mark.parametrize("value, text", [(2.35e-05, "2.35e-05"), (0.5, "0.5"), (0.123456, "0.1235"),
                                         (0.99999, "1"), (0.0, "0")])
def test_thresholds_keep_their_digits(value: float, text: str) -> None:
    assert format_threshold(value) == text


def test_tiny_threshold_prints_with_digits_in_report_and_console(tmp_path: Path) -> None:
    y, score = _scores(60, 0.6)
    report = write_report(tmp_path, y, _probs(score), CLASSES, {"value": 2.35e-05, "method": "youden"}, "val",
                          n_boot=50)
    md = (tmp_path / "report.md").read_text()
    assert "**2.35e-05**" in md and "0.0000" not in md.split("## Confusion")[0].split("## Threshold")[1]
    assert "threshold 2.35e-05 (youden" in summary_table(report)


def test_group_auc_only_where_the_group_holds_both_classes(tmp_path: Path) -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1])
    score = np.array([.1, .2, .3, .6, .9, .8, .4, .7, .2, .3, .8, .9])
    groups = ["IM series"] * 4 + ["bacteria"] * 4 + ["other"] * 4
    report = write_report(tmp_path, y, _probs(score), CLASSES, {"value": 0.5}, "val", n_boot=50, groups=groups)
    g = report["groups"]["groups"]
    assert g["IM series"]["auc"] is None and g["bacteria"]["auc"] is None
    assert g["other"]["auc"] == 1.0
    assert report["groups"]["worst"]["auc"] == {"group": "other", "value": 1.0}
    md = (tmp_path / "report.md").read_text()
    assert "| IM series | 4 | 0 | n/a | 0.7500 | n/a: one class |" in md
    assert "| bacteria | 4 | 4 | 0.7500 | n/a | n/a: one class |" in md
    assert "| other | 4 | 2 | 1.0000 | 1.0000 | 1.0000 |" in md


def _best_marks(fig) -> dict[str, set[float]]:  # noqa: ANN001
    """{panel title: x of its vertical 'best' lines}."""
    return {ax.get_title(): {float(line.get_xdata()[0]) for line in ax.get_lines()
                             if (line.get_label() or "").startswith("best")} for ax in fig.axes}


# val loss is lowest at epoch 2 while val AUC peaks at epoch 3: the AUC epoch is the checkpointed one
HISTORY = [{"epoch": e, "train_loss": tl, "val_loss": vl, "val_auc": auc, "val_accuracy": acc}
           for e, tl, vl, auc, acc in [(1, .7, .6, .70, .6), (2, .5, .4, .80, .7), (3, .4, .5, .90, .8),
                                       (4, .3, .7, .85, .9)]]


@pytest.mark.parametrize("best_epoch, expected", [(None, 3.0), (4, 4.0)])
def test_one_best_epoch_on_every_panel(best_epoch: int | None, expected: float) -> None:
    marks = _best_marks(training_figure(HISTORY, best_epoch=best_epoch))
    assert set(marks) == {"loss", "auc", "accuracy"}
    assert all(m == {expected} for m in marks.values()), marks
