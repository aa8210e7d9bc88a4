"""Validating at a new site: `pneumo sample`, `pneumo calibrate` and label-free `--adapt` that refuses itself.

Two synthetic sites (`pneumo.data.synth`): the bundle is trained on site A (EfficientNet-Lite0
features + a logistic head, `helpers.make_feature_bundle`); site B is drawn through another
acquisition chain (a softer detector: blur; a flatter exposure: lower contrast), and its patients are split
into a labelled sample (what a radiologist labels) and held-out images (what the site then scores).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import folder_images, folder_labels, make_feature_bundle, score

from pneumo.bundle.manifest import read_manifest
from pneumo.bundle.predict import Predictor
from pneumo.data.datasets import patient_id
from pneumo.data.synth import Acquisition, synthesize
from pneumo.labels import positive_score
from pneumo.monitor.drift import DriftReference
from pneumo.report.metrics import roc_curve

SIZE = (96, 128)
PX = 96
SITE_B = Acquisition(blur=0.02, contrast=0.8)  # a softer detector, a flatter exposure
FAST = ["--batch-size", "32", "--read-batch-size", "32", "--max-actors", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("sites")
    a = synthesize(root / "A", 240, seed=0, size_range=SIZE, splits=("train", "val"))
    split = {s: sorted(p for p in a if p.parent.parent.name == s) for s in ("train", "val")}
    manifest, _, _ = make_feature_bundle(root / "bundle", split["train"], split["val"], PX, c=0.01)
    b = sorted(synthesize(root / "B", 200, seed=5, size_range=SIZE, acquisition=SITE_B))
    patients = sorted({patient_id(p) for p in b})
    rng = np.random.default_rng(0)
    labelled = set(rng.choice(patients, len(patients) // 2, replace=False))
    sample = [p for p in b if patient_id(p) in labelled]
    held = [p for p in b if patient_id(p) not in labelled]
    folder = root / "site_sample"  # the labelled sample as a site would hand it over: NORMAL/ and PNEUMONIA/
    for p in sample:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / p.parent.name / p.name)
    return {"root": root, "bundle": root / "bundle", "manifest": manifest, "sample": sample, "held": held,
            "folder": folder, "archive": root / "B"}


def _pneumo(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    pneumo = Path(sys.executable).with_name("pneumo")
    return subprocess.run([str(pneumo), *argv], capture_output=True, text=True, timeout=timeout)


def _held_scores(bundle: Path, held: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    p = Predictor(bundle, precision="fp32")
    return folder_labels(held), positive_score(p.predict(folder_images(held, p.spec)), p.classes)


def _spec_at_sensitivity(y: np.ndarray, s: np.ndarray, sensitivity: float) -> float:
    fpr, tpr, _ = roc_curve(y, s)
    return float(1 - fpr[np.argmax(tpr >= sensitivity)])


def test_calibrate_reports_the_bundle_as_it_is_first_then_writes_a_new_version(sites, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "site_bundle"
    r = _pneumo("calibrate", str(sites["bundle"]), str(sites["folder"]), "--out", str(out), "--n-boot", "200")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[pneumo calibrate]")]
    assert lines[0].startswith("[pneumo calibrate] the bundle as it is on this sample: auc ")
    assert "recalibrated" in lines[1] and "cross-validated" in lines[2] and "wrote" in lines[3]
    parent, new = sites["manifest"], read_manifest(out)
    lineage = new.lineage
    assert lineage["parent"]["sha256"] == parent.sha256 and lineage["operation"] == "calibrate"
    counts = lineage["sample"]["counts"]
    assert lineage["sample"]["n"] == len(sites["sample"]) == sum(counts.values()) and min(counts.values()) >= 10
    assert len(lineage["sample"]["fingerprint"]) == 64
    assert set(lineage["reports"]) == {"parent", "recalibrated", "cross_validated"}
    assert new.threshold["chosen_on"] == "site sample" and new.threshold["method"] == "target_sensitivity"
    assert new.calibration["method"] == "platt" and new.calibration["fitted_on"] == "site sample"
    assert new.has_onnx and new.version.startswith(parent.version + "+site-")
    reports = Path(f"{out}-reports")
    assert (reports / "parent" / "report.md").exists() and (reports / "recalibrated" / "report.md").exists()
    assert "this site's own labelled sample" in (reports / "parent" / "report.md").read_text()
    # the drift reference holds the site's images too, and the new bundle scores like any other
    p = Predictor(out)
    ref: DriftReference = p.drift_reference()
    old = Predictor(sites["bundle"]).drift_reference()
    assert len(ref.sample) == len(old.sample) + len(sites["sample"]) and ref.meta["cohorts"][-1].startswith("site")
    assert p.engine in ("onnxruntime", "openvino") and p.threshold == new.threshold_value  # an ONNX engine: auto picks one
    # a ranking-preserving recalibration: held-out AUC unchanged, the operating point moved to the site
    y, s_parent = _held_scores(sites["bundle"], sites["held"])
    _, s_new = _held_scores(out, sites["held"])
    sens_parent = float((s_parent[y == 1] >= parent.threshold_value).mean())
    sens_new = float((s_new[y == 1] >= new.threshold_value).mean())
    print(f"held-out site sensitivity: parent {sens_parent:.3f}, recalibrated {sens_new:.3f} (target 0.95)")
    assert abs(sens_new - 0.95) <= abs(sens_parent - 0.95) + 0.05


def test_refit_head_raises_specificity_at_the_same_sensitivity_on_held_out_images(sites, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "refit"
    r = _pneumo("calibrate", str(sites["bundle"]), str(sites["folder"]), "--out", str(out), "--refit-head",
                "--n-boot", "200")
    assert r.returncode == 0, r.stderr[-3000:]
    new = read_manifest(out)
    assert new.calibration["method"] == "refit_head" and new.lineage["refit_head"] is True
    assert set(new.calibration["cv_log_loss"]) and new.calibration["strength"] > 0
    y, s_parent = _held_scores(sites["bundle"], sites["held"])
    _, s_new = _held_scores(out, sites["held"])
    parent_spec, new_spec = (_spec_at_sensitivity(y, s, 0.9) for s in (s_parent, s_new))
    print(f"held-out site specificity at 90% sensitivity: parent {parent_spec:.3f}, refitted {new_spec:.3f}")
    assert new_spec > parent_spec


def test_a_labelled_csv_works_and_a_sample_too_small_is_refused(sites, tmp_path) -> None:  # noqa: ANN001
    def write(rows: list[tuple[Path, str]]) -> Path:
        path = tmp_path / f"labels{len(rows)}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "probability", "predicted", "reason", "drift_distance", "label"])
            w.writerows([(str(p), "", "", "", "", label) for p, label in rows] + [("/unlabelled.png", "", "", "", "", "")])
        return path

    rows = [(p, p.parent.name) for p in sites["sample"]]
    few_normal = [r for r in rows if r[1] == "PNEUMONIA"] + [r for r in rows if r[1] == "NORMAL"][:5]
    r = _pneumo("calibrate", str(sites["bundle"]), str(write(few_normal)), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "5 NORMAL" in r.stderr and "at least 10" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    r = _pneumo("calibrate", str(sites["bundle"]), str(write(rows)), "--out", str(tmp_path / "y"), "--rule",
                "lower_bound", "--target-sensitivity", "0.99")
    assert r.returncode == 2 and "--rule lower_bound" in r.stderr and "label more positive images" in r.stderr


def test_sample_spans_the_score_range_and_includes_the_most_drifted(ray_local, sites, tmp_path) -> None:  # noqa: ANN001
    archive = tmp_path / "archive"
    shutil.copytree(sites["archive"], archive)
    for p in sorted(sites["root"].glob("A/val/*/*.jpeg"))[:40]:  # the training site's images too: a mixed archive
        shutil.copy(p, archive / p.name)
    result = score(archive, sites["bundle"], tmp_path / "scores", *FAST[4:])
    sample_csv = tmp_path / "sample.csv"
    r = _pneumo("sample", str(tmp_path / "scores"), "--n", "20", "--out", str(sample_csv))
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(archive) not in r.stdout + r.stderr  # paths are written to the CSV, never printed
    rows = list(csv.DictReader(sample_csv.open()))
    assert len(rows) == 20 and {row["label"] for row in rows} == {""}
    assert {row["reason"] for row in rows} == {"score_range", "most_drifted"}
    assert sum(row["reason"] == "most_drifted" for row in rows) == 5  # --drifted 0.25
    from pneumo.score.runs import run_rows
    from pneumo.score.sample import drift_distances

    table, marker = run_rows(tmp_path / "scores")
    ok = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "ok"]
    probs = np.array(table.column("probability").to_pylist(), dtype=float)[ok]
    picked = np.array([float(row["probability"]) for row in rows])
    assert picked.min() <= np.quantile(probs, 0.1) and picked.max() >= np.quantile(probs, 0.9)  # the whole range
    dist = drift_distances([table.column("embedding").to_pylist()[i] for i in ok], Predictor(sites["bundle"]).drift_reference())
    paths = np.array(table.column("path").to_pylist())[ok]
    top = set(paths[np.argsort(-dist)[:5]])
    assert top == {row["path"] for row in rows if row["reason"] == "most_drifted"}
    assert marker["run_id"] == result.run_id


def test_align_adapts_and_every_method_refuses_itself_when_unsafe(ray_local, sites, tmp_path) -> None:  # noqa: ANN001
    result = score(sites["archive"], sites["bundle"], tmp_path / "a", *FAST[4:], "--adapt", "--adapt-methods", "align",
                   "--adapt-sample", "64")
    a = result.adaptation
    assert a["model"]["applied"] == ["align"] and a["methods"] == "align" and "refused" not in a["model"]
    assert read_manifest(Path(result.run_dir) / "adapted_bundle").has_onnx  # a head change exports
    # a reference whose statistics are nonsense: aligned, every image is one class; the run scores unadapted
    from pneumo.bundle.store import load_bundle, save_bundle
    from pneumo.monitor.drift import FILE_NAME

    model, manifest = load_bundle(sites["bundle"])
    ref = Predictor(sites["bundle"]).drift_reference()
    ref.feature_mean = ref.feature_mean + 50 * (ref.feature_std + 1e-3)
    bad = tmp_path / "bad_reference"
    save_bundle(model, bad, manifest.model, manifest.classes, manifest.input, threshold=manifest.threshold,
                training=manifest.training, extra_files={FILE_NAME: ref.to_bytes()})
    refused = score(sites["archive"], bad, tmp_path / "b", *FAST[4:], "--adapt", "--adapt-methods", "align,em",
                    "--adapt-sample", "64")
    m = refused.adaptation["model"]
    assert m["applied"] == [] and "collapses to one class" in m["refused"], m
    assert "refused" in refused.adaptation["line"]
    from pneumo.score.runs import committed_runs

    record = committed_runs(tmp_path / "b")[-1]  # the run's record in its Delta commit
    assert record["run_id"] == refused.run_id and record["adaptation"]["model"]["refused"] == m["refused"]


def test_em_refuses_a_prevalence_at_the_boundary(sites) -> None:  # noqa: ANN001
    from pneumo.score.adaptation import estimate_prior

    almost_all = np.tile([[0.001, 0.999]], (200, 1))  # every image confidently PNEUMONIA
    weights, info = estimate_prior(sites["manifest"], almost_all)
    assert weights is None and "boundary" in info["em_refused"] and info["prevalence_estimate"] >= 0.99
    mixed = np.tile([[0.9, 0.1], [0.1, 0.9]], (100, 1))  # half and half, calibrated: EM lands inside
    weights, info = estimate_prior(sites["manifest"], mixed)
    assert weights is not None and "em_refused" not in info


def test_calibrate_and_sample_work_on_s3(sites, s3_server, tmp_path) -> None:  # noqa: ANN001
    from pneumo.config import parse_config
    from pneumo.io.storage import Location
    from pneumo.score.calibrate import CalibrateConfig, run_calibrate

    bucket = s3_server.make_bucket("site-b")
    s3_server.upload_dir(sites["folder"], "site-b", "labelled")
    cfg = parse_config(CalibrateConfig, [str(sites["bundle"]), f"{bucket}/labelled", "--out", f"{bucket}/bundle",
                                         "--s3-endpoint", s3_server.endpoint, "--reports", str(tmp_path / "r"),
                                         "--n-boot", "100"])
    lineage = run_calibrate(cfg)
    new = read_manifest(Location.resolve(f"{bucket}/bundle", s3_server.endpoint))
    assert new.lineage["sample"]["fingerprint"] == lineage["sample"]["fingerprint"]
    assert lineage["sample"]["n"] == len(sites["sample"])
    p = Predictor(Location.resolve(f"{bucket}/bundle", s3_server.endpoint))
    assert p.threshold == new.threshold_value and (tmp_path / "r" / "parent" / "report.json").exists()


@pytest.mark.parametrize(("share", "val_share", "refused"), [
    (0.79, 0.707, False),  # blur-2px: false positives in excess of val's share; align helped
    (0.95, 0.707, False),  # zoom-0.75
    (0.707, 0.707, True),  # val itself: nothing to correct
    (0.69, 0.707, True),  # sharpen: align cut specificity there
    (0.21, 0.707, True),  # val at 20% pneumonia: align's class-mix assumption is broken
])
def test_align_refuses_without_an_excess_of_positives(share: float, val_share: float, refused: bool) -> None:
    from pneumo.score.adaptation import align_refusal

    reason = align_refusal(share, val_share)
    assert (reason is not None) == refused and (not refused or "class mix" in reason)
