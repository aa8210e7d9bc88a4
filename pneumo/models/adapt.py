"""Label-free adaptation of a model's BatchNorm statistics to a new domain (AdaBN, Li et al. 2016):
`pneumo score --adapt --adapt-methods adabn` and training's `bn_images`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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
