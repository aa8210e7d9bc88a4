"""Training on a real local Ray: learning, resume, fault injection, early stopping, val-only threshold.

Two small Ray Train runs are shared by the tests of this module (module fixtures), on the
synthetic data set from `pneumo.synth` at 48-64 px, so the whole file stays around two minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumo.config import parse_config
from pneumo.train.config import TrainConfig
from pneumo.train.driver import run
from pneumo.train.worker import FAULT_ENV

BASE = ["--model", "seed_cnn", "--weights", "none", "--batch-size", "16", "--val-frac", "0.2",
        "--test-frac", "0.2", "--num-workers", "2", "--optimizer", "adam", "--lr", "0.001"]


def _cfg(data: Path, out: Path, *extra: str) -> TrainConfig:
    return parse_config(TrainConfig, [str(data), "--out", str(out), *BASE, *extra], prog="test")


@pytest.fixture(scope="module")
def learned(ray_local, synth_data, tmp_path_factory):  # noqa: ANN001
    """A 2-worker seed_cnn run of 4 epochs at 64 px (threshold by target sensitivity 0.95)."""
    out = tmp_path_factory.mktemp("learn") / "run"
    cfg = _cfg(synth_data, out, "--image-size", "64", "--epochs", "4", "--patience", "0",
               "--threshold-method", "target_sensitivity", "--target-sensitivity", "0.95")
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def faulted(ray_local, synth_data, tmp_path_factory):  # noqa: ANN001
    """Rank 1 exits at epoch 2 (once, via PNEUMO_TEST_FAIL_AT_EPOCH, which `fit` forwards to the
    workers of the already running local Ray); min_delta makes val loss 'never improve' after
    epoch 1, so early stopping (patience 2) ends the run at epoch 3 of 6."""
    root = tmp_path_factory.mktemp("fault")
    marker = root / "failed-once"
    cfg = _cfg(synth_data, root / "run", "--image-size", "48", "--epochs", "6", "--patience", "2",
               "--min-delta", "1.0", "--max-steps-per-epoch", "2", "--max-failures", "2", "--no-report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, f"2:{marker}")
        return cfg, run(cfg), marker


@pytest.fixture(scope="module")
def learned_nothing(ray_local, synth_data, tmp_path_factory):  # noqa: ANN001
    """One epoch of two steps at lr 0: the random initial weights, exported as if trained."""
    out = tmp_path_factory.mktemp("nothing") / "run"
    cfg = _cfg(synth_data, out, "--image-size", "48", "--epochs", "1", "--lr", "0", "--max-steps-per-epoch", "2")
    return cfg, run(cfg)


def _manifest(summary: dict) -> dict:
    return json.loads(Path(summary["bundle"], "manifest.json").read_text())


def test_two_worker_run_learns_exports_bundle_and_report(learned):
    cfg, summary = learned
    assert summary["epochs_run"] == 4
    assert summary["metrics"]["val"]["auc"] > 0.9
    manifest = _manifest(summary)
    assert manifest["model"] == "seed_cnn" and manifest["classes"] == ["NORMAL", "PNEUMONIA"]
    assert manifest["input"]["size"] == 64
    assert [h["epoch"] for h in manifest["training"]["history"]] == [1, 2, 3, 4]
    assert {"val_loss", "val_auc", "val_accuracy", "val_sensitivity", "val_specificity"} <= set(
        manifest["training"]["history"][-1])
    assert len(manifest["training"]["data_fingerprint"]) == 64
    out = Path(cfg.out)
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert not {"fail_at_epoch", "fail_marker"} & set(manifest["training"]["config"])  # test knobs: env only
    assert "fail_at_epoch" not in (out / "config.yaml").read_text()
    for split in ("val", "test"):
        rep = out / "report" / split
        for name in ("report.json", "report.md", "roc.png", "pr.png", "calibration.png", "training_curves.png"):
            assert (rep / name).stat().st_size > 0, rep / name


def test_threshold_is_chosen_on_val_not_test(learned, synth_data):
    from pneumo.bundle.predict import Predictor
    from pneumo.data.datasets import labelled_splits
    from pneumo.io.preprocess import load_image
    from pneumo.io.storage import Location
    from pneumo.report.thresholds import choose_threshold

    cfg, summary = learned
    predictor = Predictor(summary["bundle"], precision="fp32")
    records = labelled_splits(str(synth_data), "binary", cfg.val_frac, cfg.test_frac, cfg.seed)
    chosen = {}
    for split in ("val", "test"):
        recs = [r for r in records if r.split == split]
        images = np.stack([load_image(Location.of(r.path).read_bytes(), r.path, predictor.spec) for r in recs])
        y = np.array([r.label != "NORMAL" for r in recs], dtype=int)
        score = predictor.positive_probability(predictor.predict(images))
        chosen[split] = choose_threshold(y, score, method="target_sensitivity", target=0.95)
    assert chosen["val"] != pytest.approx(chosen["test"]), "val and test must disagree for this test to mean anything"
    threshold = predictor.manifest.threshold
    assert threshold["method"] == "target_sensitivity" and threshold["target"] == 0.95
    assert threshold["value"] == pytest.approx(chosen["val"], abs=1e-6)


def test_rerun_with_same_name_and_storage_resumes(learned, tmp_path):
    cfg, first = learned
    first_history = _manifest(first)["training"]["history"]
    again = parse_config(TrainConfig, [cfg.data, "--config", str(Path(cfg.out) / "config.yaml"), "--epochs", "5",
                                       "--name", cfg.run_name, "--storage-path", cfg.storage,
                                       "--out", str(tmp_path / "again"), "--no-report"], prog="test")
    summary = run(again)
    training = _manifest(summary)["training"]
    assert summary["epochs_run"] == 5
    assert training["starts"] == [0, 4], "the second run must start after epoch 4, not from scratch"
    assert [h["epoch"] for h in training["history"]] == [1, 2, 3, 4, 5]
    assert training["history"][:4] == first_history


def test_worker_failure_resumes_without_repeating_or_skipping_epochs(faulted):
    _, summary, marker = faulted
    assert marker.exists(), "the injected failure did not happen"
    training = _manifest(summary)["training"]
    assert training["starts"] == [0, 1], "after the failure the group must restart from the epoch-1 checkpoint"
    assert [h["epoch"] for h in training["history"]] == [1, 2, 3]


def test_early_stopping_triggers(faulted):
    _, summary, _ = faulted
    assert summary["early_stopped"] is True
    assert summary["epochs_run"] == 3 < 6


@pytest.mark.parametrize("which", ["learned", "learned_nothing"])
def test_report_summary_and_console_say_when_a_model_is_no_good(which, request):
    """A run that learned nothing is flagged in summary.json, the console summary, report.md and
    the bundle (what serving shows); a run that learned carries no flag but its small val split's."""
    from pneumo.train.export import summary_text

    cfg, summary = request.getfixturevalue(which)
    flags = summary["red_flags"]
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["red_flags"] == flags
    assert _manifest(summary)["training"]["red_flags"] == flags
    model_flags = [f for f in flags if not f.startswith("too few val images")]
    md = (Path(cfg.out) / "report" / "val" / "report.md").read_text().split("## Metrics")[0]
    if which == "learned":
        assert model_flags == [], flags
        return
    assert model_flags, flags  # AUC below 0.7 or chance, one class predicted, an edge threshold...
    assert any(w in f for f in model_flags for w in ("AUC", "is 0", "predicted", "edge")), flags
    assert f"RED FLAGS ({len(flags)})" in summary_text(summary)
    assert "Red flags: this model is no good" in md and all(f in md for f in model_flags)
