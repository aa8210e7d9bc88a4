"""An ensemble of frozen backbones as one registry model: their pooled features, concatenated, one head.

    model = get_model("efficientnet_lite_ensemble", 2, weights="pretrained")
    feats = model.forward_head(model.forward_features(x), pre_logits=True)   # [N, 1280 + 1280 + 1280]

Each member is a timm model built without a classifier (`num_classes=0`, so its forward is the
pooled embedding) and sees the input resized (bilinear, inside the graph) to its own native size
(Lite0 224, Lite1 240, Lite2 260), the scale its ImageNet weights were trained at. It behaves like a timm model where pneumo relies on one (`forward_features`,
`forward_head(pre_logits=True)`, `get_classifier`), so the frozen-feature cache, the ONNX export
and the bundle treat it as any other model: one artifact, one graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FeatureEnsemble(nn.Module):
    def __init__(self, members: Sequence[str], num_out: int = 1, drop_rate: float = 0.0,
                 sizes: Sequence[int] | None = None):
        super().__init__()
        import timm

        self.member_names = list(members)
        self.sizes = list(sizes) if sizes else [0] * len(self.member_names)  # 0: as given
        self.members = nn.ModuleList(timm.create_model(m, pretrained=False, num_classes=0) for m in members)
        self.num_features = sum(m.num_features for m in self.members)
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(self.num_features, num_out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for member, size in zip(self.members, self.sizes):
            xi = x if not size or size == x.shape[-1] else nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False)
            outs.append(member(xi))
        return torch.cat(outs, dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier
