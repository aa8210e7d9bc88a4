"""bf16 vs fp32 agreement on real X-rays, through the one Predictor (the path scoring and serving use).

The bundle is efficientnet_lite0 (pretrained backbone) with a logistic head fitted
(scikit-learn) on the fp32 embeddings of half of 200 real images (every other one), so the AUC
over all 200 is high but not trivially 1 and a precision change could move it. fp32 runs on
ONNX Runtime, bf16 on torch autocast and on OpenVINO (where the CPU runs bf16 natively, as its
gate requires).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pneumo.bundle.predict import Predictor
from pneumo.bundle.store import save_bundle
from pneumo.io.preprocess import load_image
from pneumo.models.factory import get_model
from pneumo.models.zoo import get_spec
from pneumo.precision import cpu_bf16_native

N_PER_CLASS = 100


BF16_ENGINES = ["torch"] + (["openvino"] if cpu_bf16_native() else [])


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize("engine", BF16_ENGINES)
def test_bf16_auc_within_0002_of_fp32_on_real_images(shared_data, tmp_path, engine: str) -> None:  # noqa: ANN001
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
    images = np.stack([load_image(p.read_bytes(), str(p), spec) for p, _ in files])
    _, feats = Predictor(str(tmp_path / "backbone"), precision="fp32").predict_with_features(images)
    fit = slice(0, None, 2)  # fit on every other image; score all of them
    head = LogisticRegression(C=0.1, max_iter=2000).fit(feats[fit], labels[fit])
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head.coef_).float())
        model.classifier.bias.copy_(torch.from_numpy(head.intercept_).float())
    save_bundle(model, str(tmp_path / "fitted"), "efficientnet_lite0", ["NORMAL", "PNEUMONIA"], spec)

    p32 = Predictor(str(tmp_path / "fitted"), engine="onnxruntime", precision="fp32")
    p16 = Predictor(str(tmp_path / "fitted"), engine=engine, precision="bf16")
    assert (p32.engine, p16.engine, p16.precision) == ("onnxruntime", engine, "bf16")
    s32 = p32.positive_probability(p32.predict(images))
    s16 = p16.positive_probability(p16.predict(images))
    auc32, auc16 = roc_auc_score(labels, s32), roc_auc_score(labels, s16)
    assert auc32 > 0.8, f"fitted head should separate the classes (fp32 AUC {auc32:.3f})"
    assert abs(auc16 - auc32) <= 0.002, f"bf16 AUC {auc16:.4f} vs fp32 {auc32:.4f}"
    assert np.mean((s16 >= 0.5) == (s32 >= 0.5)) >= 0.97  # the same decisions, nearly always
