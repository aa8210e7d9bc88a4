"""Grad-CAM heatmaps and PNG overlays, for `--explain` in batch scoring and `?explain=true` in serving.

    heat = gradcam(model, x)                  # x: float[1, C, H, W] from preprocess.to_tensor
    png = overlay_png(gray_uint8, heat)       # bytes of an RGB PNG

The target layer is the model's last convolution; the score explained is the positive score
(the one logit for binary models, `logsumexp(others) - NORMAL` for k classes).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn


def last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def gradcam(model: nn.Module, x: torch.Tensor, negative_index: int = 0, layer: nn.Module | None = None) -> np.ndarray:
    """Heatmap float32[H, W] in [0, 1] for one image `x` of shape [1, C, H, W]."""
    layer = layer or last_conv(model)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        captured["act"] = output
        return output * 1.0  # keep `act` out of reach of in-place ops downstream

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(False)
            logits = model(x).float()
            if logits.shape[1] == 1:
                score = logits[0, 0]
            else:
                others = torch.cat([logits[0, :negative_index], logits[0, negative_index + 1 :]])
                score = torch.logsumexp(others, 0) - logits[0, negative_index]
            (grad,) = torch.autograd.grad(score, captured["act"])
    finally:
        handle.remove()
        model.train(was_training)
    act = captured["act"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).cpu().numpy().astype(np.float32)


def overlay_png(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """An RGB PNG of the grayscale image with the heatmap (jet colours) blended on top."""
    from matplotlib import colormaps
    from PIL import Image

    gray = np.asarray(gray, dtype=np.uint8)
    if heat.shape != gray.shape:
        heat = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(gray.shape[::-1], Image.BILINEAR)) / 255.0
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    base = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    blend = (1 - alpha * heat[..., None]) * base + alpha * heat[..., None] * colour
    buf = io.BytesIO()
    Image.fromarray((np.clip(blend, 0, 1) * 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
