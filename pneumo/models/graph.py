"""The scoring graph: a registry model -> `x -> (probs, features)`, the one graph every engine runs.

    graph = scoring_module(model, "efficientnet_lite0", num_classes=2)   # x -> (probs, features)
    probs = probabilities(logits, num_classes)                           # one logit or k, as probabilities

`ScoringModule` takes `float[N, C, S, S]` (exactly what `pneumo.io.preprocess.to_tensor` makes)
to `probs float[N, K]` and `features float[N, F]` (the input of the classifier head: the pooled
embedding that drift monitoring compares). Torch runs it eagerly; `pneumo.models.onnx` exports
it for ONNX Runtime.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from pneumo.models.zoo import TTA_MODES, get_spec


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part) if not part.isdigit() else module[int(part)]  # type: ignore[index]
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    owner = _get(module, parent) if parent else module
    if last.isdigit():
        owner[int(last)] = value  # type: ignore[index]
    else:
        setattr(owner, last, value)


def probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One logit -> [1-p, p]; k logits -> softmax. Always float32 [N, num_classes]."""
    logits = logits.float()
    if num_classes == 2:
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


class ScoringModule(nn.Module):
    """`x -> (probs, features)` around a registry model, with optional test-time augmentation.

    It takes the model apart in place: `body` is the model with its head replaced by Identity
    (so `body(x)` is the head's input), `head` the classifier. Pass a copy to keep the original.
    """

    def __init__(self, model: nn.Module, head: str, num_classes: int, tta: Sequence[str] = ()):
        super().__init__()
        unknown = set(tta) - set(TTA_MODES)
        if unknown:
            raise ValueError(f"tta={sorted(unknown)}; valid: {', '.join(TTA_MODES)}")
        self.head = _get(model, head)
        _set(model, head, nn.Identity())
        self.body = model
        self.num_classes = num_classes
        self.hflip = "hflip" in tta

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if self.hflip:  # the embedding of an image is the mean of its own and its mirror's
            x = torch.cat([x, torch.flip(x, dims=[3])])
        feats = torch.flatten(self.body(x), 1)
        if self.hflip:
            feats = (feats[:n] + feats[n:]) / 2
        # a 1x1-conv classifier (timm's resnetv2) takes the pooled map back as [N, C, 1, 1]
        logits = self.head(feats[:, :, None, None]) if isinstance(self.head, nn.Conv2d) else self.head(feats)
        return probabilities(torch.flatten(logits, 1), self.num_classes), feats.float()


def scoring_module(model: nn.Module, model_name: str, num_classes: int, tta: Sequence[str] = (),
                   copy_model: bool = True) -> ScoringModule:
    model = copy.deepcopy(model) if copy_model else model
    return ScoringModule(model.float().eval(), get_spec(model_name).head, num_classes, tta).eval()
