"""Drift wired into training and batch scoring: the bundle's reference, `pneumo score`'s drift.json
and drift.png, and `--adapt` (AdaBN + EM prevalence), on the real local Ray and real synthetic files.

The bundle is made by training's own `export_run` (ONNX export with its parity check, val scored
through `Predictor.from_model`, threshold chosen on val, drift reference built from val), over a
cheap model: EfficientNet-Lite0 (ImageNet weights) at 96 px whose BatchNorm statistics are set on
the training images (as training would leave them) and whose classifier is a logistic regression
fitted on the pooled training embeddings. Archives are `pneumo.synth` drawings: from the training
distribution (another seed), with an acquisition shift (lower contrast, blur), and with a changed
prevalence (`pneumonia_frac=0.2` against 0.6 at training). Measured on that last archive (truth
0.20, training 0.60): EM alone estimates 0.18; AdaBN then EM 0.02, because AdaBN re-estimated on a
mostly-NORMAL archive pulls every score down (it assumes the class mix did not change).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import folder_images, folder_labels, make_feature_bundle

from pneumo.bundle.manifest import BundleError, read_file, read_manifest
from pneumo.config import parse_config
from pneumo.data.synth import Acquisition, synthesize
from pneumo.io.storage import Location
from pneumo.monitor.drift import FILE_NAME, DriftReference
from pneumo.score.config import ScoreConfig
from pneumo.score.driver import format_summary, run_score
from pneumo.score.runs import committed_runs, read_results

SIZE = (96, 128)
PX = 96  # model input: small to stay fast on two cores
CLASSES = ["NORMAL", "PNEUMONIA"]
# fp32: `auto` is bf16 on CPUs that run it natively, which moves this quick head's posteriors
# (EM alone gave 0.12 instead of 0.18 below), so results would depend on the machine
FAST = ["--batch-size", "32", "--read-batch-size", "32", "--max-actors", "1", "--precision", "fp32"]


_images, _labels = folder_images, folder_labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # noqa: ANN001, ANN201
    """A bundle written by `export_run` (with its drift reference) and the archives to score."""
    root = tmp_path_factory.mktemp("driftint")
    paths = synthesize(root / "base", 300, seed=0, size_range=SIZE, splits=("train", "val"))
    split = {s: sorted(p for p in paths if p.parent.parent.name == s) for s in ("train", "val")}
    manifest, outputs, counts = make_feature_bundle(root / "bundle", split["train"], split["val"], PX)
    archives = {
        "iid": synthesize(root / "iid", 80, seed=1, size_range=SIZE),
        "contrast": synthesize(root / "contrast", 60, seed=2, size_range=SIZE, acquisition=Acquisition(contrast=0.5)),
        "blur": synthesize(root / "blur", 60, seed=2, size_range=SIZE, acquisition=Acquisition(blur=0.02)),
        "prevalence": synthesize(root / "prevalence", 100, seed=3, size_range=SIZE, pneumonia_frac=0.2),
    }
    return {"root": root, "bundle": root / "bundle", "manifest": manifest, "outputs": outputs, "counts": counts,
            "archives": archives}


def _score(data: Path, bundle: Path | str, out: str, *extra: str):  # noqa: ANN202
    return run_score(parse_config(ScoreConfig, [str(data), "--bundle", str(bundle), "--out", out, *FAST, *extra]))


# ---------------------------------------------------------------- (a) the bundle's reference


def test_training_stores_the_reference_in_the_bundle(trained) -> None:  # noqa: ANN001
    from pneumo.bundle.predict import Predictor

    bundle, manifest = str(trained["bundle"]), trained["manifest"]
    assert FILE_NAME in manifest.files
    ref = DriftReference.from_bytes(read_file(bundle, read_manifest(bundle), FILE_NAME))
    n_val = sum(trained["counts"]["val"].values())
    assert ref.n == n_val and ref.threshold == manifest.threshold_value
    assert ref.mean.shape == (trained["outputs"].features["val"].shape[1],)  # the head's input, pooled
    from_predictor = Predictor(bundle, precision="fp32").drift_reference()
    assert from_predictor.to_bytes() == ref.to_bytes()


@pytest.mark.parametrize("tamper", ["flip_byte", "truncate", "swap_for_another_reference"])
def test_a_tampered_reference_is_refused(trained, tmp_path: Path, tamper: str) -> None:  # noqa: ANN001
    from pneumo.bundle.predict import Predictor

    copy = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], copy)
    path = copy / FILE_NAME
    data = path.read_bytes()
    if tamper == "flip_byte":
        data = data[:-1] + bytes([data[-1] ^ 1])
    elif tamper == "truncate":
        data = data[: len(data) // 2]
    else:
        ref = DriftReference.from_bytes(data)
        ref.threshold += 0.01
        data = ref.to_bytes()
    path.write_bytes(data)
    with pytest.raises(BundleError, match="sha256|does not match"):
        read_file(str(copy), read_manifest(str(copy)), FILE_NAME)
    with pytest.raises(BundleError):
        Predictor(str(copy)).drift_reference()


# ---------------------------------------------------------------- (b, c) pneumo score judges drift


@pytest.mark.parametrize("archive,out_kind,shift", [
    ("iid", "s3", False),
    ("contrast", "local", True),
    ("blur", "local", True),
])
def test_score_writes_the_drift_verdict(ray_local, trained, tmp_path: Path, request, archive: str, out_kind: str,
                                        shift: bool) -> None:  # noqa: ANN001
    if out_kind == "s3":
        s3 = request.getfixturevalue("s3_server")
        out = s3.make_bucket("pneumo-drift") + "/scores"
        extra: tuple[str, ...] = ("--s3-endpoint", s3.endpoint)
    else:
        out, extra = str(tmp_path / "out"), ()
    result = _score(trained["root"] / archive, trained["bundle"], out, *extra)
    run_dir = Location.resolve(result.run_dir, extra[1] if extra else None)
    report = json.loads(run_dir.join("drift.json").read_bytes())
    assert report["shift"] is shift and report["status"] == ("drift" if shift else "ok"), report["line"]
    assert set(report["tests"]) == {"mmd", "ks", "positive_rate"} and report["n"] == result.counts["ok"]
    assert run_dir.join("drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (record,) = committed_runs(Location.resolve(out, extra[1] if extra else None))  # the commit's metadata
    assert record["drift"]["shift"] is shift and record["drift"]["line"] == report["line"]
    assert result.drift["line"] in format_summary(result).splitlines()[4]
    assert report["line"].startswith("DRIFT: " if shift else "drift: this run looks like")
    df = read_results(Location.resolve(out, extra[1] if extra else None))
    assert (df.status == "ok").all() and df.adapted.isna().all() and df.prevalence_estimate.isna().all()
    k = DriftReference.from_bytes((trained["bundle"] / FILE_NAME).read_bytes()).components.shape[0]
    assert 2 <= k <= 32 and all(len(e) == k for e in df.embedding)


def test_a_bundle_without_reference_is_not_judged(ray_local, trained, tmp_path: Path) -> None:  # noqa: ANN001
    from pneumo.bundle.manifest import write_manifest

    old = tmp_path / "old_bundle"
    shutil.copytree(trained["bundle"], old)
    manifest = read_manifest(str(old))
    del manifest.files[FILE_NAME]
    (old / FILE_NAME).unlink()
    write_manifest(str(old), manifest)
    result = _score(trained["root"] / "iid", old, str(tmp_path / "out"))
    report = json.loads((Path(result.run_dir) / "drift.json").read_text())
    assert report["shift"] is False and report["status"] == "no_reference"
    assert "no reference in this bundle" in report["line"] and not (Path(result.run_dir) / "drift.png").exists()
    assert result.counts["ok"] == 80 and read_results(str(tmp_path / "out")).embedding.isna().all()


# ---------------------------------------------------------------- (d) --adapt


@pytest.mark.parametrize("methods", ["em", "adabn,em"])
def test_adapt_moves_the_prevalence_estimate_toward_the_truth(ray_local, trained, tmp_path: Path,
                                                              methods: str) -> None:  # noqa: ANN001
    paths = trained["archives"]["prevalence"]
    truth = float(_labels(paths).mean())
    train = trained["counts"]["train"]
    train_prev = train["PNEUMONIA"] / sum(train.values())
    out = str(tmp_path / "out")
    result = _score(trained["root"] / "prevalence", trained["bundle"], out, "--adapt", "--adapt-sample", "64",
                    "--adapt-methods", methods)
    a, tag = result.adaptation, methods.replace(",", "+")
    print(f"{methods}: truth {truth:.3f}, training {train_prev:.3f}, estimate {a['prevalence_estimate']:.3f}")
    assert a["training_prevalence"] == pytest.approx(train_prev) and a["methods"] == tag
    if methods == "em":  # EM alone on the bundle's own posteriors: close (0.18 for a truth of 0.20)
        assert abs(a["prevalence_estimate"] - truth) < abs(train_prev - truth) / 4
    else:
        # toward the truth, but AdaBN assumes the class mix did not change: statistics re-estimated on
        # an archive of mostly NORMAL images pull every score down, and EM then overshoots (~0.02)
        assert abs(a["prevalence_estimate"] - truth) < abs(train_prev - truth) * 0.75
        assert a["prevalence_estimate"] < train_prev - 0.3 and a["model"]["images"] == 64
        assert a["model"]["applied"] == ["adabn"] and "refused" not in a["model"]
        adapted = read_manifest(str(Path(result.run_dir) / "adapted_bundle"))
        assert FILE_NAME in adapted.files and not adapted.has_onnx
    assert a["line"] in format_summary(result)
    (record,) = committed_runs(out)
    assert record["adaptation"]["prevalence_estimate"] == pytest.approx(a["prevalence_estimate"], rel=1e-12)
    assert record["config"]["adapt"] is True
    df = read_results(out)
    assert len(df) == 100 and df.adapted.eq(tag).all()
    assert df.prevalence_estimate.eq(a["prevalence_estimate"]).all()
    assert df.model_version.str.endswith("+adabn").all() == ("adabn" in methods)
    # probabilities re-weighted to the estimated prior: their mean is the estimate (EM's fixed point)
    assert df.probability.mean() == pytest.approx(a["prevalence_estimate"], abs=1e-3)
    assert np.allclose([v[1] for v in df.probabilities], df.probability)
    assert ((df.probability >= trained["manifest"].threshold_value) == (df.label == "PNEUMONIA")).all()
    for part in result.files:  # the files themselves were rewritten before the commit
        assert set(pq.read_table(Path(out) / part).column("adapted").to_pylist()) == {tag}
    assert sorted(p.name for p in Path(out).glob("part-*.parquet")) == sorted(result.files)  # none left behind
    assert json.loads((Path(result.run_dir) / "drift.json").read_text())["n"] == 100


def test_adabn_refuses_the_onnx_engine() -> None:
    from pneumo.config import ConfigError

    adabn = {"adapt_methods": "adabn"}
    for bad in ({"engine": "onnxruntime", **adabn}, {"precision": "int8", **adabn}, {"adapt_sample": 1},
                {"adapt_methods": "em,tta"}):
        with pytest.raises(ConfigError, match="torch engine|adapt_sample|adapt_methods"):
            ScoreConfig(data="d", bundle="b", out="o", adapt=True, **bad).validate()
    ScoreConfig(data="d", bundle="b", out="o", adapt=True, engine="torch", **adabn).validate()
    for methods in ("em", "align", "align,em"):  # the head and the probabilities: any engine
        ScoreConfig(data="d", bundle="b", out="o", adapt=True, engine="onnxruntime", adapt_methods=methods).validate()
