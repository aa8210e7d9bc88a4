"""The packaged EfficientNet-Lite0 weights are real ImageNet features: a linear probe on real
X-rays beats the same probe on random-init features by a wide margin (issue: ~95% vs ~86%)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pneumo.data.datasets import labelled_splits
from pneumo.io.preprocess import load_image, to_tensor
from pneumo.models.factory import get_model
from pneumo.models.zoo import get_spec

pytestmark = pytest.mark.shared_data


def _pick(records, label: str, split: str, n: int):
    chosen = [r for r in records if r.label == label and r.split == split]
    return chosen[:: max(1, len(chosen) // n)][:n]


@torch.inference_mode()
def _features(model, images: np.ndarray, spec) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 50):
        x = to_tensor(images[i : i + 50], spec, channels_last=True)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out)


def _probe_accuracy(f_train, y_train, f_test, y_test, l2: float = 1e-3) -> float:
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + c > 0).float() == y_test).float().mean())


def test_packaged_weights_beat_random_init_in_a_linear_probe(shared_data) -> None:
    root = shared_data / "chest_xray_224"
    if not root.exists():
        pytest.skip(f"{root} is absent")
    records = labelled_splits(str(root), val_frac=0.0, test_frac=0.25, seed=0)  # split by patient
    train = _pick(records, "NORMAL", "train", 150) + _pick(records, "PNEUMONIA", "train", 150)
    test = _pick(records, "NORMAL", "test", 50) + _pick(records, "PNEUMONIA", "test", 50)
    assert not {r.patient_id for r in train} & {r.patient_id for r in test}
    spec = get_spec("efficientnet_lite0").input

    def load(recs):
        with ThreadPoolExecutor(4) as pool:
            return np.stack(list(pool.map(lambda r: load_image(open(r.path, "rb").read(), r.path, spec), recs)))

    x_train, x_test = load(train), load(test)
    y_train = torch.tensor([r.label == "PNEUMONIA" for r in train], dtype=torch.float32)
    y_test = torch.tensor([r.label == "PNEUMONIA" for r in test], dtype=torch.float32)
    torch.manual_seed(0)
    scores = {}
    for weights in ("pretrained", "none"):
        model = get_model("efficientnet_lite0", 2, weights=weights).eval().to(memory_format=torch.channels_last)
        scores[weights] = _probe_accuracy(
            _features(model, x_train, spec), y_train, _features(model, x_test, spec), y_test
        )
    print(f"linear probe accuracy on 100 held-out patients' X-rays: {scores}")
    assert scores["pretrained"] >= 0.90
    assert scores["pretrained"] >= scores["none"] + 0.05
