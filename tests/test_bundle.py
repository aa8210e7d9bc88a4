"""The model bundle: round trip, manifest contents, and refusal of tampered or unknown bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pneumo.bundle.manifest import MANIFEST_FILE, WEIGHTS_FILE, BundleError, read_manifest
from pneumo.bundle.predict import Predictor
from pneumo.bundle.store import load_bundle, save_bundle
from pneumo.io.preprocess import InputSpec
from pneumo.io.storage import Location
from pneumo.labels import decide
from pneumo.models.factory import get_model
from pneumo.models.graph import probabilities as logits_to_probs
from pneumo.models.zoo import get_spec

SMALL = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.25,))


def _bundle(tmp_path, name="seed_cnn", classes=("NORMAL", "PNEUMONIA"), **kw):
    opts = dict(get_spec(name).options)
    model = get_model(name, len(classes), input_spec=SMALL, **opts).eval()
    manifest = save_bundle(model, str(tmp_path / "b"), name, list(classes), SMALL,
                           threshold={"value": 0.3, "method": "youden", "target": None},
                           metrics={"val": {"auc": 0.9}}, training={"config": {"epochs": 1}},
                           model_options=opts, **kw)
    return model, manifest, tmp_path / "b"


def test_round_trip_same_outputs_and_manifest(tmp_path) -> None:
    model, manifest, path = _bundle(tmp_path)
    loaded, m2 = load_bundle(str(path))
    x = torch.randn(3, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    data = json.loads((path / MANIFEST_FILE).read_text())
    for key in ("format_version", "model", "classes", "input", "threshold", "metrics", "training",
                "created_at", "versions", "sha256"):
        assert key in data
    assert m2.input == SMALL and m2.threshold_value == 0.3 and m2.sha256 == manifest.sha256
    assert {"pneumo", "torch"} <= set(data["versions"])


def test_tampered_weights_refused(tmp_path) -> None:
    _, _, path = _bundle(tmp_path)
    blob = bytearray((path / WEIGHTS_FILE).read_bytes())
    blob[-5] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(str(path))


@pytest.mark.parametrize("change, match", [
    ({"format_version": 99}, "not supported"),
    ({"surprise": 1}, "unknown keys"),
])
def test_bad_manifest_refused(tmp_path, change, match) -> None:
    _, _, path = _bundle(tmp_path)
    data = json.loads((path / MANIFEST_FILE).read_text())
    data.update(change)
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=match):
        read_manifest(str(path))


def test_missing_bundle_is_clear(tmp_path) -> None:
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(str(tmp_path / "nope"))


def test_bundle_on_s3(tmp_path, s3_server) -> None:
    s3_server.make_bucket("bundles")
    model = get_model("seed_cnn", 2, input_spec=SMALL)
    where = Location.resolve("s3://bundles/run1/bundle", s3_server.endpoint)
    save_bundle(model, where, "seed_cnn", ["NORMAL", "PNEUMONIA"], SMALL)
    loaded, manifest = load_bundle(where)
    assert manifest.model == "seed_cnn"
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_predictor_three_class_and_threshold(tmp_path) -> None:
    _, _, path = _bundle(tmp_path, name="cnn_dropout", classes=("NORMAL", "BACTERIA", "VIRUS"))
    p = Predictor(str(path), precision="fp32")
    probs = p.predict(np.random.default_rng(0).integers(0, 255, (5, 48, 48), dtype=np.uint8))
    assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert len(p.labels(probs)) == 5 and set(p.labels(probs)) <= {"NORMAL", "BACTERIA", "VIRUS"}
    assert p.predict(np.zeros((0, 48, 48), np.uint8)).shape == (0, 3)


@pytest.mark.parametrize("probs, threshold, expected", [
    ([[0.8, 0.2]], 0.5, ["NORMAL"]),
    ([[0.8, 0.2]], 0.1, ["PNEUMONIA"]),
    ([[0.4, 0.6]], 0.6, ["PNEUMONIA"]),
    ([[0.4, 0.6]], 0.61, ["NORMAL"]),
])
def test_decide_binary(probs, threshold, expected) -> None:
    assert decide(np.array(probs), ["NORMAL", "PNEUMONIA"], threshold) == expected


@pytest.mark.parametrize("probs, threshold, expected", [
    ([[0.7, 0.2, 0.1]], 0.5, "NORMAL"),
    ([[0.3, 0.2, 0.5]], 0.5, "VIRUS"),
    ([[0.3, 0.5, 0.2]], 0.5, "BACTERIA"),
    ([[0.6, 0.3, 0.1]], 0.35, "BACTERIA"),
])
def test_decide_three_class(probs, threshold, expected) -> None:
    assert decide(np.array(probs), ["NORMAL", "BACTERIA", "VIRUS"], threshold) == [expected]


def test_logits_to_probs() -> None:
    p = logits_to_probs(torch.tensor([[0.0], [100.0]]), 2)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert torch.allclose(logits_to_probs(torch.zeros(2, 3), 3), torch.full((2, 3), 1 / 3))
