"""The ONNX engines (ONNX Runtime, OpenVINO): export + parity for every registered model on both,
verified files, `pneumo export` for older bundles, and the bf16 / int8 gates on every engine that
runs them (real exports, real sessions, real files). The engine choice (`auto`): test_engine_choice.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pneumo.bundle.gates import precision_gate
from pneumo.bundle.manifest import (
    FORMAT_VERSION,
    INT8_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    BundleError,
    read_manifest,
)
from pneumo.bundle.predict import EngineError, Predictor
from pneumo.bundle.store import save_bundle
from pneumo.bundle.upgrade import quantize_bundle
from pneumo.cli import main as cli
from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.models.factory import CUSTOM_BUILDERS, get_model, register_builder
from pneumo.models.graph import ScoringModule
from pneumo.models.onnx import export_checked
from pneumo.models.zoo import ModelSpec, get_spec, list_models, register, unregister
from pneumo.precision import PrecisionError, cpu_bf16_native

CLASSES = ["NORMAL", "PNEUMONIA"]
# Models that cannot export: none today. A model listed here must say why; it falls back to torch.
CANNOT_EXPORT: dict[str, str] = {}


# VGG's AdaptiveAvgPool2d(7) exports only where 7 divides the feature map: its native 224 px.
NATIVE_SIZE_ONLY = {"vgg19"}


def _spec(name: str) -> InputSpec:
    spec = get_spec(name).input
    if spec.channels == 1 or name in NATIVE_SIZE_ONLY:
        return spec
    return spec.replace(size=96)  # small inputs keep the table fast


def _images(spec: InputSpec, n: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, spec.size, dtype=np.float32)[None, None, :]
    return np.clip(rng.normal(0, 40, (n, spec.size, spec.size)) + ramp, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_with_parity(name: str, tmp_path) -> None:
    spec = _spec(name)
    model = get_model(name, 2, input_spec=spec, **get_spec(name).options).eval()
    if name in CANNOT_EXPORT:
        pytest.skip(CANNOT_EXPORT[name])
    images = _images(spec)
    m = save_bundle(model, str(tmp_path / "b"), name, CLASSES, spec, model_options=get_spec(name).options,
                    parity_images=images)
    assert m.has_onnx, m.onnx
    assert m.onnx["parity"]["max_abs_diff"] <= 1e-4 and m.onnx["parity"]["source"] == "val images"
    eager = Predictor(str(tmp_path / "b"), engine="torch", precision="fp32", channels_last=False)
    p2, f2 = eager.predict_with_features(images)
    for engine in ("onnxruntime", "openvino"):
        p = Predictor(str(tmp_path / "b"), engine=engine, precision="fp32")
        assert (p.engine, p.precision, eager.engine) == (engine, "fp32", "torch")
        p1, f1 = p.predict_with_features(images)
        assert np.abs(p1 - p2).max() <= 1e-4, engine
        assert f1.shape == f2.shape and f1.shape[0] == len(images) and f1.shape[1] > 0
        assert np.abs(f1 - f2).max() <= 1e-3 * max(1.0, float(np.abs(f2).max())), engine


def test_three_class_and_tta_graph_match_torch(tmp_path) -> None:
    spec = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.25,))
    model = get_model("cnn_dropout", 3, input_spec=spec, **get_spec("cnn_dropout").options).eval()
    images = _images(spec)
    blob, record = export_checked(model, "cnn_dropout", 3, spec, images, tta=("hflip",))
    assert record["tta"] == ["hflip"]
    # TTA: the head sees the mean embedding of the image and its mirror
    graph = ScoringModule(model, get_spec("cnn_dropout").head, 3, tta=("hflip",)).eval()
    x = to_tensor(images, spec)
    with torch.no_grad():
        probs, feats = graph(x)
        mean = (torch.flatten(graph.body(x), 1) + torch.flatten(graph.body(torch.flip(x, dims=[3])), 1)) / 2
        assert torch.allclose(feats, mean, atol=1e-6)
        assert torch.allclose(probs, torch.softmax(graph.head(mean), 1), atol=1e-6)


class _Branchy(nn.Module):
    """Data-dependent Python control flow: tracing bakes in one branch, so ORT disagrees."""

    def __init__(self, num_out: int = 1, **_: object):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pool(x).flatten(1)
        if float(f.mean()) > 0:  # noqa: SIM108 - the point of the model
            f = f * 3
        return self.classifier(f)


@pytest.fixture()
def branchy():
    spec = InputSpec(size=32, channels=1, mean=(0.0,), std=(1.0,))
    register_builder("branchy_test", lambda num_out, input_spec, **o: _Branchy(num_out))
    register(ModelSpec("branchy_test", "custom:branchy_test", spec, "classifier", "none"))
    yield spec
    unregister("branchy_test")
    CUSTOM_BUILDERS.pop("branchy_test")


def test_export_refused_on_parity_failure_bundle_stays_torch_only(branchy, tmp_path, caplog) -> None:
    model = _Branchy().eval()
    with torch.no_grad():
        model.classifier.weight.fill_(2.0)
    images = np.full((4, 32, 32), 200, np.uint8)  # mean > 0: the branch the zero trace input did not take
    m = save_bundle(model, str(tmp_path / "b"), "branchy_test", CLASSES, branchy, parity_images=images)
    assert not m.has_onnx and "disagree" in m.onnx["refused"] and "torch-only" in m.onnx["refused"]
    assert not (tmp_path / "b" / ONNX_FILE).exists()
    p = Predictor(str(tmp_path / "b"))
    assert p.engine == "torch" and "disagree" in p.describe()["engine_fallback"]
    with pytest.raises(EngineError, match="no model.onnx"):
        Predictor(str(tmp_path / "b"), engine="onnxruntime")


def test_tampered_onnx_refused(tmp_path) -> None:
    spec = _spec("seed_cnn")
    save_bundle(get_model("seed_cnn", 2).eval(), str(tmp_path / "b"), "seed_cnn", CLASSES, spec)
    path = tmp_path / "b" / ONNX_FILE
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="model.onnx sha256"):
        Predictor(str(tmp_path / "b"))
    assert Predictor(str(tmp_path / "b"), engine="torch").engine == "torch"  # torch reads only its own file


def test_old_bundle_upgrades_with_pneumo_export(synth_data, tmp_path) -> None:
    spec = InputSpec(size=64, channels=1, mean=(0.5,), std=(0.25,))
    model = get_model("seed_cnn", 2, input_spec=spec).eval()
    bundle = tmp_path / "old"
    save_bundle(model, str(bundle), "seed_cnn", CLASSES, spec, onnx=False,
                training={"config": {"data": str(synth_data), "label_set": "binary", "val_frac": 0.2,
                                     "test_frac": 0.2, "seed": 0}})
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())  # what a format-1 bundle looked like
    for key in ("files", "onnx", "gates"):
        manifest.pop(key)
    manifest["format_version"] = 1
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    old = Predictor(str(bundle), channels_last=False)  # NCHW: the layout the parity check compares with
    assert old.engine == "torch" and old.fallback
    assert cli(["export", str(bundle)]) == 0
    m = read_manifest(str(bundle))
    assert m.has_onnx and m.format_version == FORMAT_VERSION and m.onnx["parity"]["source"] == "val images"
    new = Predictor(str(bundle))
    images = _images(spec)
    assert new.engine in ("onnxruntime", "openvino") and new.precision == "fp32"
    assert np.abs(new.predict(images) - old.predict(images)).max() <= 1e-4


SPEC64 = InputSpec(size=64, channels=1, mean=(0.5,), std=(0.25,))


def _brightness_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark NORMAL and bright PNEUMONIA images: a task a random seed_cnn ranks perfectly."""
    level = np.r_[np.full(n // 2, 50), np.full(n - n // 2, 200)]
    noise = np.random.default_rng(seed).normal(0, 25, (n, 64, 64))
    return np.clip(noise + level[:, None, None], 0, 255).astype(np.uint8), (level > 100).astype(np.int64)


OUTLIER = 2048.0


def _gate_bundle(tmp_path, outlier: bool = False) -> str:
    """A seed_cnn bundle with its threshold between the two groups. `outlier` adds an activation
    outlier: every first-layer activation rides on an offset of 2,048 that the second conv takes
    off again. fp32 carries it (24-bit mantissa), but bf16 (8 bits: steps of 16 there) and one uint8
    scale per tensor (steps of ~8) leave the signal underneath no resolution: the classic failure
    of both. (The offset passes ReLU, the identity BatchNorm and max-pooling unchanged, and no
    padding spoils the second conv's compensation, so fp32 is the same function.)"""
    torch.manual_seed(0)
    model = get_model("seed_cnn", 2, input_spec=SPEC64).eval()
    if outlier:
        with torch.no_grad():
            model.features[0].bias += OUTLIER
            bn = model.features[2]
            shift = OUTLIER * bn.weight / torch.sqrt(bn.running_var + bn.eps)  # what reaches the second conv
            conv = model.features[4]
            conv.bias -= (conv.weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    val, labels = _brightness_data(64, seed=2)
    score = Predictor.from_model(model, save_bundle(model, str(tmp_path / "probe"), "seed_cnn", CLASSES,
                                                    SPEC64, onnx=False)).predict(val)[:, 1]
    middle = float((score[labels == 0].max() + score[labels == 1].min()) / 2)
    save_bundle(model, str(tmp_path / "b"), "seed_cnn", CLASSES, SPEC64,
                threshold={"value": middle, "method": "test", "target": None})
    return str(tmp_path / "b")


# (engine, precision) pairs whose gate runs on this machine: bf16 only where the CPU runs it natively
GATED = [("onnxruntime", "int8"), ("openvino", "int8"), ("openvino", "fp32")] + (
    [("openvino", "bf16")] if cpu_bf16_native() else [])


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """The gates run once on a normal bundle and once on one with an activation outlier."""
    (calib, _), (val, labels) = _brightness_data(32, seed=1), _brightness_data(64, seed=2)
    out = {}
    for kind in ("normal", "outlier"):
        bundle = _gate_bundle(tmp_path_factory.mktemp(kind), outlier=kind == "outlier")
        out[kind] = bundle, quantize_bundle(bundle, calib, val, labels)
    return out


@pytest.mark.parametrize("engine, precision", GATED)
def test_gate_passes_a_normal_model(gated, engine: str, precision: str) -> None:
    bundle, m = gated["normal"]
    g = m.gate(engine, precision)
    assert g["passed"], g
    if precision != "fp32":
        assert g["auc"] == 1.0 and g["agreement"] == 1.0
    (_, _), (val, labels) = _brightness_data(32, seed=1), _brightness_data(64, seed=2)
    p = Predictor(bundle, engine=engine, precision=precision)
    assert (p.engine, p.precision) == (engine, precision)
    assert p.labels(p.predict(val)) == [CLASSES[i] for i in labels]


@pytest.mark.parametrize("engine, precision", [g for g in GATED if g[1] != "fp32"])
def test_gate_refuses_a_model_with_an_activation_outlier(gated, engine: str, precision: str) -> None:
    bundle, m = gated["outlier"]
    g = m.gate(engine, precision)
    assert not g["passed"] and g["reason"], g
    (_, _), (val, labels) = _brightness_data(32, seed=1), _brightness_data(64, seed=2)
    fp32 = Predictor(bundle, engine="onnxruntime", precision="fp32")
    assert fp32.labels(fp32.predict(val)) == [CLASSES[i] for i in labels]  # fp32 is fine
    assert read_manifest(bundle).gate(engine, precision) == g  # the figures are kept
    auto = Predictor(bundle)
    assert auto.precision == "fp32" and f"{engine} {precision}" in auto.choice.excluded


def test_int8_file_kept_only_when_an_engine_passed(gated) -> None:
    (_, m), (outlier, bad) = gated["normal"], gated["outlier"]
    assert m.has_int8 and m.gate("onnxruntime", "int8")["calibration_split"] == "train"
    passed = [e for e in ("onnxruntime", "openvino") if bad.gate(e, "int8")["passed"]]
    assert bad.has_int8 == bool(passed) and (tmp := Path(outlier) / INT8_FILE).exists() == bool(passed), tmp
    if not passed:
        with pytest.raises(PrecisionError, match="int8"):
            Predictor(outlier, precision="int8")


def test_format_2_bundle_reads_its_int8_gate_as_onnxruntimes(gated, tmp_path) -> None:
    bundle, m = gated["normal"]
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    d = json.loads((old / MANIFEST_FILE).read_text())
    d["format_version"], d["int8"] = 2, d.pop("gates")["onnxruntime"]["int8"]
    (old / MANIFEST_FILE).write_text(json.dumps(d))
    back = read_manifest(str(old))
    assert back.gate("onnxruntime", "int8") == m.gate("onnxruntime", "int8") and back.gate("openvino", "int8") is None
    p = Predictor(str(old), precision="int8")
    assert (p.engine, p.precision) == ("onnxruntime", "int8")  # OpenVINO int8 was never gated on it


@pytest.mark.parametrize("auc_drop, flips, passed", [(0.0, 0, True), (0.0, 2, False), (0.01, 0, False)])
def test_precision_gate_table(auc_drop: float, flips: int, passed: bool) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50, np.int64), np.ones(50, np.int64)]
    score = np.r_[rng.uniform(0, 0.45, 50), rng.uniform(0.55, 1, 50)]
    other = score.copy()
    other[:flips] = 0.9  # negatives pushed over the threshold
    if auc_drop:
        other[50:60] = 0.01 + np.arange(10) * 0.001  # positives below every negative: AUC falls
    probs = lambda s: np.c_[1 - s, s]  # noqa: E731
    gate = precision_gate(probs(score), probs(other), labels, CLASSES, 0.5)
    assert gate["passed"] is passed


def test_int8_needs_an_onnx_engine() -> None:
    from pneumo import precision as P

    with pytest.raises(PrecisionError, match="onnxruntime or openvino"):
        P.resolve("int8", torch.device("cpu"), engine="torch")
    with pytest.raises(PrecisionError, match="not available on onnxruntime"):
        P.resolve("bf16", torch.device("cpu"), engine="onnxruntime")
    assert P.resolve("auto", torch.device("cpu"), engine="onnxruntime") == "fp32"
    assert P.resolve("auto", torch.device("cpu"), engine="torch") == "fp32"  # never an ungated bf16 by itself


@pytest.mark.parametrize("precision", ["fp32"] + (["bf16"] if cpu_bf16_native() else []))
def test_feature_cache_runs_on_an_onnx_engine_and_matches_torch(precision: str, caplog, capfd) -> None:
    import logging

    from pneumo.train.feature_cache import (
        BF16_MARGIN,
        backbone_features,
        relative_error,
        torch_features,
    )

    caplog.set_level(logging.INFO)
    spec = get_spec("efficientnet_lite0").input.replace(size=64)
    model = get_model("efficientnet_lite0", 2, input_spec=spec).eval()
    images = torch.from_numpy(_images(spec, 10))
    batches = [{"image": images[:6], "label": torch.zeros(6)}, {"image": images[6:], "label": torch.ones(4)}]
    cpu = torch.device("cpu")
    eager, y1 = backbone_features(model, batches, spec, cpu, channels_last=False)
    fast, y2 = backbone_features(model, batches, spec, cpu, precision, model_name="efficientnet_lite0", threads=1,
                                 total=10, label="train features")
    assert fast.shape == eager.shape == (10, 1280) and torch.equal(y1, y2)
    if precision == "fp32":
        assert torch.allclose(fast, eager, rtol=1e-3, atol=1e-4)
        assert "feature cache: onnxruntime fp32" in caplog.text or "feature cache: openvino fp32" in caplog.text
        assert "fp32 features vs torch fp32" in caplog.text
    else:
        torch_bf16 = torch_features(model, to_tensor(images, spec), "bf16", cpu)
        assert relative_error(fast, eager) <= BF16_MARGIN * relative_error(torch_bf16, eager) + 1e-3
        assert "feature cache: openvino bf16" in caplog.text and "eager torch bf16:" in caplog.text
    assert "eager torch instead" not in caplog.text  # the engine really computed them
    assert "[pneumo train] train features: 10/10 images" in capfd.readouterr().out  # the closing line
