"""Label-free adaptation of a model to a new archive (`pneumo score --adapt`):

- `adapt_batchnorm`: BatchNorm statistics re-estimated on the archive (AdaBN, Li et al. 2016;
  also training's `bn_images`);
- `align_head`: the linear head re-expressed for embeddings standardised to the reference's
  statistics (a diagonal CORAL, folded into the head).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def adapt_batchnorm(model: Any, batches: Iterable[Any]) -> Any:
    """AdaBN: re-estimate every BatchNorm's running mean/var on `batches` (input tensors) of the new
    domain, as a plain average (momentum=None), without gradients; returns the model in eval mode."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()  # only the norms: dropout and the like stay in eval
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if bns and not seen:
        raise ValueError("adapt_batchnorm: no batches; the running statistics were reset")
    return model


def align_head(weight: np.ndarray, bias: np.ndarray, ref_mean: np.ndarray, ref_std: np.ndarray, site_mean: np.ndarray,
               site_std: np.ndarray, max_ratio: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """A linear head that sees an archive's embeddings standardised to the reference's statistics
    (per-feature mean and standard deviation: the diagonal form of CORAL, Sun et al. 2016), folded
    into the head: w . ((f - m_s) / s_s * s_r + m_r) + b = (w * s_r / s_s) . f + (b + w . (m_r - m_s * s_r / s_s)).
    The scale ratios are clipped to [1/max_ratio, max_ratio]: a feature that barely varies in the
    archive must not be blown up. Written by hand: folding the map into the head is two lines."""
    eps = 1e-6
    ratio = np.clip((np.asarray(ref_std) + eps) / (np.asarray(site_std) + eps), 1 / max_ratio, max_ratio)
    w = np.atleast_2d(np.asarray(weight, dtype=np.float64))  # [outputs, F]
    new_b = np.asarray(bias, dtype=np.float64).reshape(-1) + w @ (np.asarray(ref_mean) - np.asarray(site_mean) * ratio)
    return (w * ratio).astype(np.float32), new_b.astype(np.float32)
