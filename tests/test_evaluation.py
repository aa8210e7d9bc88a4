"""pneumo.evaluation (reports, evaluate_bundle, `pneumo evaluate`) and the evaluation plots, on real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pneumo.data.datasets import labelled_splits, split_parameters
from pneumo.report import plots
from pneumo.report.writer import REPORT_METRICS, write_report
from pneumo.score.evaluate import EvaluateConfig, evaluate_bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {"split", "n", "n_errors", "classes", "counts", "threshold", "metrics", "ci", "ci_level", "bootstrap",
               "confusion", "confusion_matrix", "calibration", "plots", "errors"}
HISTORY = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auc": 0.7 + 0.05 * e, "val_accuracy": 0.8,
            "stage": "full"} for e in range(1, 5)]
# the carve-out the fake training run used: deliberately not the defaults
TRAIN_SPLIT = {"label_set": "binary", "val_frac": 0.25, "test_frac": 0.3, "seed": 7, "limit": 0}
CORRUPT = "train/NORMAL/IM-0999-0001.jpeg"


def _scores(n: int, classes: list[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative (but imperfect) probabilities for `classes`."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(classes), n)
    logits = rng.normal(size=(n, len(classes))) + 2.0 * np.eye(len(classes))[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


# ---------------------------------------------------------------- write_report


@pytest.mark.parametrize(
    ("classes", "history"),
    [(["NORMAL", "PNEUMONIA"], HISTORY), (["NORMAL", "BACTERIA", "VIRUS"], None)],
    ids=["binary+history", "three_class"],
)
def test_write_report_writes_all_files_and_keys(tmp_path, classes, history):
    y, probs = _scores(300, classes)
    threshold = {"value": 0.4, "method": "target_sensitivity", "target": 0.95}
    report = write_report(tmp_path, y, probs, classes, threshold, "test", history=history,
                          extra={"source": "test"}, n_boot=200)
    expected_pngs = {"roc.png", "pr.png", "calibration.png", "confusion.png"} | (
        {"training_curves.png"} if history else set())
    for name in expected_pngs:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert set(report["plots"].values()) == expected_pngs
    assert not (tmp_path / "training_curves.png").exists() or history
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert REPORT_KEYS <= set(on_disk)
    assert set(on_disk["metrics"]) == set(REPORT_METRICS)
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        lo, hi = on_disk["ci"][key]
        assert lo <= on_disk["metrics"][key] <= hi
    assert on_disk["n"] == 300 and np.sum(on_disk["confusion_matrix"]) == 300
    assert len(on_disk["confusion_matrix"]) == len(classes)
    assert ("multiclass" in on_disk) == (len(classes) > 2)
    c = on_disk["confusion"]
    assert c["tp"] + c["fn"] == int((y != 0).sum())  # NORMAL is index 0: everything else is positive
    md = (tmp_path / "report.md").read_text()
    assert "| AUC (ROC) |" in md and "95% CI" in md and "threshold **0.4**" in md
    assert "chosen on validation data only, never on test" in md
    for name in expected_pngs:
        assert f"]({name})" in md


def test_report_matches_metrics_and_flags_val_chosen_threshold_on_val(tmp_path):
    from pneumo.report.metrics import binary_metrics

    classes = ["NORMAL", "PNEUMONIA"]
    y, probs = _scores(200, classes, seed=3)
    report = write_report(tmp_path, y, probs, classes, {"value": 0.5, "method": "youden", "target": None}, "val",
                          n_boot=100)
    direct = binary_metrics(y == 1, probs[:, 1], 0.5)
    assert report["metrics"]["sensitivity"] == pytest.approx(direct["sensitivity"])
    assert report["confusion"] == direct["confusion"]
    assert "same data the threshold was chosen on" in (tmp_path / "report.md").read_text()


def test_report_json_has_no_nan_when_a_class_is_missing(tmp_path):
    classes = ["NORMAL", "PNEUMONIA"]
    probs = np.tile([[0.3, 0.7]], (5, 1))
    report = write_report(tmp_path, [1] * 5, probs, classes, {"value": 0.5}, "test", n_boot=50)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and report["metrics"]["auc"] is None
    assert "n/a" in (tmp_path / "report.md").read_text()


def test_plots_return_png_paths(tmp_path):
    y, probs = _scores(100, ["NORMAL", "PNEUMONIA"])
    outs = [
        plots.roc_plot(y, probs[:, 1], tmp_path / "a" / "roc.png", threshold=0.5),
        plots.pr_plot(y, probs[:, 1], tmp_path / "pr.png"),
        plots.calibration_plot(y, probs[:, 1], tmp_path / "cal.png", n_bins=5),
        plots.confusion_plot([[3, 1], [0, 4]], ["NORMAL", "PNEUMONIA"], tmp_path / "cm.png"),
        plots.training_curves({"train_loss": [1.0, 0.5], "val_loss": [1.2, 0.9]}, tmp_path / "tc.png"),
        plots.training_curves([], tmp_path / "empty.png"),
    ]
    for path in outs:
        assert Path(path).read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- evaluate_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny labelled dataset (one corrupt file) and a real seed_cnn bundle trained 'with' TRAIN_SPLIT."""
    import torch

    from pneumo.bundle.store import save_bundle
    from pneumo.data.synth import synthesize
    from pneumo.io.preprocess import InputSpec
    from pneumo.models.factory import get_model

    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    synthesize(data, 48, seed=1, size_range=(40, 56), workers=2)
    (data / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 4)
    spec = InputSpec(size=32, channels=1, mean=(0.5,), std=(0.25,))
    torch.manual_seed(0)
    model = get_model("seed_cnn", 2, input_spec=spec)
    bundle = root / "bundle"
    save_bundle(model, str(bundle), "seed_cnn", ["NORMAL", "PNEUMONIA"], spec,
                threshold={"value": 0.5, "method": "youden", "target": None},
                training={"config": dict(TRAIN_SPLIT), "history": HISTORY})
    return {"data": data, "bundle": bundle}


def test_split_parameters_come_from_training_config_unless_given():
    training = {"config": dict(TRAIN_SPLIT)}
    assert split_parameters(training, ["NORMAL", "PNEUMONIA"]) == TRAIN_SPLIT
    assert split_parameters({}, ["NORMAL", "BACTERIA", "VIRUS"]) == {
        "label_set": "three_class", "val_frac": 0.1, "test_frac": 0.1, "seed": 0, "limit": 0}
    assert split_parameters(training, ["NORMAL", "PNEUMONIA"], seed=3)["seed"] == 3
    with pytest.raises(ValueError, match="valid: binary, three_class"):
        split_parameters({}, ["CAT", "DOG"])


def test_evaluate_bundle_end_to_end_reports_corrupt_file(tiny, tmp_path, ray_local):
    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import load_image

    out = tmp_path / "eval"
    everything = labelled_splits(str(tiny["data"]), **TRAIN_SPLIT)
    split = next(r.split for r in everything if r.path.endswith(CORRUPT))  # the split holding the bad file
    records = [r for r in everything if r.split == split]
    report = evaluate_bundle(EvaluateConfig(str(tiny["bundle"]), str(tiny["data"]), split=split, out=str(out),
                                            batch_size=8, n_boot=100))
    # the corrupt file is reported, not dropped, by a salted hash of its path (file names carry
    # patient ids; pneumo.privacy); everything else is scored
    from pneumo.privacy import redact

    assert report["n_errors"] == 1 and report["errors"][0]["path"] == redact(str(tiny["data"] / CORRUPT))
    assert report["errors"][0]["path"].startswith("file#")
    assert report["errors"][0]["kind"] == "corrupt"
    assert report["n"] == len(records) - 1
    assert report["errors"][0]["path"] in (out / "report.md").read_text()
    for name in ("report.md", "report.json"):
        assert "IM-0999" not in (out / name).read_text(), name
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    # exactly the training carve-out (TRAIN_SPLIT from the manifest), not the default one
    assert {r["path"] for r in rows} == {r.path for r in records} - {str(tiny["data"] / CORRUPT)}
    default = {r.path for r in labelled_splits(str(tiny["data"])) if r.split == split}
    assert default != {r.path for r in records}
    # scores are the Predictor's on the shared preprocessing
    p = Predictor(str(tiny["bundle"]), device="cpu")
    row = rows[0]
    img = load_image(Path(row["path"]).read_bytes(), row["path"], p.spec)
    assert float(row["score"]) == pytest.approx(float(p.positive_probability(p.predict(np.array(img[None])))[0]), abs=1e-5)
    assert report["bundle"]["model"] == "seed_cnn" and report["extra"]["split_parameters"] == TRAIN_SPLIT
    for name in ("roc.png", "pr.png", "calibration.png", "confusion.png", "training_curves.png", "report.json"):
        assert (out / name).is_file(), name


def test_pneumo_evaluate_cli(tiny, tmp_path, capsys, ray_local):
    from pneumo.cli import main

    out = tmp_path / "cli"
    rc = main(["evaluate", str(tiny["bundle"]), str(tiny["data"]), "--split", "test", "--out", str(out),
               "--n-boot", "100"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "[pneumo evaluate] test split" in printed and "AUC (ROC)" in printed and "95% CI" in printed
    report = json.loads((out / "report.json").read_text())
    n_test = sum(r.split == "test" for r in labelled_splits(str(tiny["data"]), **TRAIN_SPLIT))
    assert report["split"] == "test" and report["n"] + report["n_errors"] == n_test


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--split", "val", "--val-frac", "0"], "no images in split 'val'"),
     (["--split", "test", "--label-set", "three_class"], "does not predict")],
)
def test_pneumo_evaluate_cli_errors_are_clear(tiny, tmp_path, capsys, args, message):
    from pneumo.cli import main

    rc = main(["evaluate", str(tiny["bundle"]), str(tiny["data"]), "--out", str(tmp_path), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_pneumo_evaluate_rejects_unknown_flag(tiny, capsys):
    from pneumo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tiny["bundle"]), str(tiny["data"]), "--splt", "test"])
    assert exc.value.code == 2


def test_evaluate_bundle_and_data_on_s3(tiny, tmp_path, s3_server, ray_local):
    bucket = s3_server.make_bucket("pneumo-eval")
    s3_server.upload_dir(tiny["data"], "pneumo-eval", "data")
    s3_server.upload_dir(tiny["bundle"], "pneumo-eval", "bundle")
    report = evaluate_bundle(EvaluateConfig(f"{bucket}/bundle", f"{bucket}/data", split="test", out=str(tmp_path),
                                            s3_endpoint=s3_server.endpoint, n_boot=50))
    local = evaluate_bundle(EvaluateConfig(str(tiny["bundle"]), str(tiny["data"]), split="test",
                                           out=str(tmp_path / "local"), n_boot=50))
    assert report["n"] == local["n"] > 0
    assert report["metrics"] == local["metrics"]
