"""Calibration on val, folded into the head: probabilities change as fitted, rankings do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.models.calibration import fit_calibration, fold_calibration
from pneumo.models.factory import get_model
from pneumo.models.graph import scoring_module
from pneumo.models.zoo import get_spec

SPEC = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.25,))


def _probs(model, name: str, k: int, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return scoring_module(model, name, k)(x)[0].numpy()


@pytest.mark.parametrize("name, k, method", [("seed_cnn", 2, "platt"), ("cnn_dropout", 3, "temperature")])
def test_fit_then_fold_gives_the_fitted_probabilities(name: str, k: int, method: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, k, input_spec=SPEC, **get_spec(name).options).eval()
    x = to_tensor(np.random.default_rng(0).integers(0, 255, (64, 48, 48), dtype=np.uint8), SPEC)
    before = _probs(model, name, k, x)
    rng = np.random.default_rng(1)
    labels = (rng.random(64) < before[:, -1] ** 3).astype(np.int64) if k == 2 else rng.integers(0, k, 64)
    cal = fit_calibration(method, labels, before, ["NORMAL", "PNEUMONIA"] if k == 2 else ["NORMAL", "B", "V"])
    fold_calibration(model, name, cal)
    after = _probs(model, name, k, x)
    if method == "platt":
        z = np.log(before[:, 1] / before[:, 0])
        expected = 1 / (1 + np.exp(-(cal["a"] * z + cal["c"])))
        assert cal["a"] != 1.0 and np.allclose(after[:, 1], expected, atol=1e-5)
        order = np.argsort(before[:, 1])
        assert (np.diff(after[order, 1]) >= -1e-7).all() == (cal["a"] > 0)  # same ranking when a > 0
    else:
        logp = np.log(before)
        z = logp / cal["temperature"]
        expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        assert np.allclose(after, expected, atol=1e-5)
    assert cal["fitted_on"] == "val" and 0 <= cal["prevalence"] <= 1


def test_prevalence_knob_follows_bayes_and_is_opt_in(tmp_path) -> None:
    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.store import save_bundle

    model = get_model("seed_cnn", 2, input_spec=SPEC).eval()
    save_bundle(model, str(tmp_path / "b"), "seed_cnn", ["NORMAL", "PNEUMONIA"], SPEC,
                extra={"calibration": {"method": "platt", "a": 1.0, "c": 0.0, "prevalence": 0.75}})
    images = np.random.default_rng(0).integers(0, 255, (8, 48, 48), dtype=np.uint8)
    plain = Predictor(str(tmp_path / "b"))
    site = Predictor(str(tmp_path / "b"), prevalence=0.25)
    p, q = plain.predict(images)[:, 1], site.predict(images)[:, 1]
    odds = (p / (1 - p)) * (0.25 / 0.75) / (0.75 / 0.25)
    assert np.allclose(q, odds / (1 + odds), atol=1e-6) and (q < p).all()
    assert plain.describe()["prevalence"] is None
    assert site.describe()["prevalence"] == {"site": 0.25, "reference": 0.75}
    with pytest.raises(ValueError, match="prevalence"):
        Predictor(str(tmp_path / "b"), prevalence=1.5)
