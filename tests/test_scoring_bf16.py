"""bf16 vs fp32 agreement on real X-rays, and bf16 off by default where the CPU only emulates it.

The bundle is efficientnet_lite0 (pretrained backbone) with a logistic head fitted in fp32 on half
of 200 real images (every other one), so the AUC over all 200 is high but not trivially 1 and a
precision change could move it.
Both precisions run through `pneumo.predict.Predictor` (the path batch scoring and serving use).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo.bundle import save_bundle
from pneumo.models import get_model, get_spec
from pneumo.predict import Predictor, bf16_native, resolve_precision
from pneumo.preprocess import load_image

N_PER_CLASS = 100


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auto_precision_is_fp32_without_native_bf16() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_native(cpu) else "fp32")


@pytest.mark.shared_data
@pytest.mark.slow
def test_bf16_auc_within_0002_of_fp32_on_real_images(shared_data, tmp_path) -> None:  # noqa: ANN001
    root = shared_data / "chest_xray_224" / "train"
    files = []
    for label, cls in ((0, "NORMAL"), (1, "PNEUMONIA")):
        paths = sorted((root / cls).glob("*.jpeg"))
        if len(paths) < N_PER_CLASS:
            pytest.skip(f"{root / cls}: fewer than {N_PER_CLASS} images")
        files += [(p, label) for p in paths[:: len(paths) // N_PER_CLASS][:N_PER_CLASS]]
    labels = np.array([y for _, y in files])

    torch.manual_seed(0)
    model = get_model("efficientnet_lite0", 2, weights="pretrained")
    spec = get_spec("efficientnet_lite0").input
    save_bundle(model, str(tmp_path / "backbone"), "efficientnet_lite0", ["NORMAL", "PNEUMONIA"], spec)
    fp32 = Predictor(str(tmp_path / "backbone"), precision="fp32")
    images = np.stack([load_image(p.read_bytes(), str(p), spec) for p, _ in files])

    # Fit a logistic head on fp32 pooled features (a trained-like bundle, no training run needed).
    head = fp32.model.classifier
    fp32.model.classifier = torch.nn.Identity()
    with torch.inference_mode():
        feats = torch.cat([fp32.model(fp32.to_input(images[s : s + 50])) for s in range(0, len(images), 50)]).float()
    fp32.model.classifier = head
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    fit = slice(0, None, 2)  # fit on every other image; score all of them
    z = ((feats - mu) / sd)[fit]
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100)
    y = torch.tensor(labels[fit], dtype=torch.float32)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 1e-2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        model.classifier.weight.copy_((w / sd).view(1, -1))
        model.classifier.bias.copy_(b - (w / sd) @ mu)
    save_bundle(model, str(tmp_path / "fitted"), "efficientnet_lite0", ["NORMAL", "PNEUMONIA"], spec)

    # fp32 scores are the fitted head on the fp32 features (the same forward pass, done once);
    # bf16 scores go through the bundle and Predictor(precision="bf16") end to end.
    with torch.no_grad():
        s32 = torch.sigmoid(model.classifier(feats)).reshape(-1).numpy()
    p16 = Predictor(str(tmp_path / "fitted"), precision="bf16")
    assert p16.precision == "bf16"
    s16 = p16.positive_probability(p16.predict(images))
    auc32, auc16 = auc(s32, labels), auc(s16, labels)
    assert auc32 > 0.8, f"fitted head should separate the classes (fp32 AUC {auc32:.3f})"
    assert abs(auc16 - auc32) <= 0.002, f"bf16 AUC {auc16:.4f} vs fp32 {auc32:.4f}"
    assert np.mean((s16 >= 0.5) == (s32 >= 0.5)) >= 0.97  # the same decisions, nearly always
