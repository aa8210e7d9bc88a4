"""Grad-CAM highlights the region that drives the score, and overlays are real PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pneumo.models.factory import get_model
from pneumo.models.gradcam import gradcam, overlay_png
from pneumo.models.zoo import get_spec, list_models


class _TwoSpots(nn.Module):
    """Two feature maps (one per input channel); the score reads only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))[:, :1].mean(dim=(2, 3))


def test_heatmap_points_at_the_evidence() -> None:
    x = torch.zeros(1, 2, 32, 32)
    x[0, 0, :16, :16] = 1.0  # evidence the score uses
    x[0, 1, 16:, 16:] = 1.0  # a bright distractor the score ignores
    heat = gradcam(_TwoSpots(), x)
    assert heat.shape == (32, 32)
    assert heat[2:14, 2:14].mean() > 0.9 and heat[18:, 18:].mean() < 0.05


@pytest.mark.parametrize("name", ["seed_cnn", "efficientnet_lite0", "resnet18"])
def test_gradcam_on_registered_models(name: str) -> None:
    if name not in list_models():
        pytest.skip(f"{name} not registered")
    spec = get_spec(name).input
    model = get_model(name, 2)
    heat = gradcam(model, torch.randn(1, spec.channels, spec.size, spec.size))
    assert heat.shape == (spec.size, spec.size) and np.isfinite(heat).all() and 0 <= heat.min() and heat.max() <= 1


def test_overlay_is_png() -> None:
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    png = overlay_png(gray, np.random.default_rng(0).random((32, 32)).astype(np.float32))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
