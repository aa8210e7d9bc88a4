"""The factory: a registry entry (`pneumo.models.zoo`) -> a torch model, with local weights only.

    model = get_model("efficientnet_lite0", num_classes=2, weights="pretrained")
    state = load_pretrained_state(get_spec("efficientnet_lite0"))    # never a download

Binary tasks get ONE output logit (sigmoid); k-class tasks get k logits (softmax): see
`num_outputs`. `weights` is `"none"` (random init), `"pretrained"` (the entry's own source,
read only from local files: the torch/timm caches or a pip package) or a path to a
`.safetensors` (or `.pth`, read with `weights_only=True`) file. Nothing here downloads:
missing weights raise `pneumo.models.weights.WeightsUnavailable`, which says where they were looked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pneumo.io.preprocess import InputSpec
from pneumo.models import cnn
from pneumo.models.ensemble import FeatureEnsemble
from pneumo.models.weights import (
    WeightsUnavailable,
    load_backbone,
    load_state_file,
    locate_pretrained,
)
from pneumo.models.zoo import ModelSpec, get_spec

Builder = Callable[..., nn.Module]  # build(num_out, input_spec, **options) -> nn.Module (random init)
CUSTOM_BUILDERS: dict[str, Builder] = {}  # arch "custom:<name>": architectures registered at run time


def register_builder(name: str, build: Builder) -> None:
    """Make `arch="custom:<name>"` buildable (a registry entry for a model defined elsewhere)."""
    if name in CUSTOM_BUILDERS:
        raise ValueError(f"builder {name!r} is already registered")
    CUSTOM_BUILDERS[name] = build


def num_outputs(num_classes: int) -> int:
    """One logit for a binary task, one per class otherwise."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: need at least 2")
    return 1 if num_classes == 2 else num_classes


def _replace_head(model: nn.Module, head: str, num_out: int) -> None:
    parent_path, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Linear(old.in_features, num_out)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def build(spec: ModelSpec, num_out: int, input_spec: InputSpec | None = None, **options: Any) -> nn.Module:
    """The entry's architecture with `num_out` outputs and random weights."""
    input_spec = input_spec or spec.input
    family, _, ref = spec.arch.partition(":")
    if family == "cnn":
        return getattr(cnn, ref)(num_out=num_out, in_channels=input_spec.channels, input_size=input_spec.size,
                                 **options)
    if family == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": 1000}
        if ref == "inception_v3":
            kwargs.update(aux_logits=False, init_weights=False)
        model = getattr(torchvision.models, ref)(**kwargs)
        _replace_head(model, spec.head, num_out)
        return model
    if family == "timm":
        import timm

        return timm.create_model(ref, pretrained=False, num_classes=num_out, **options)
    if family == "ensemble":
        members = spec.members
        return FeatureEnsemble(members, num_out, sizes=[get_spec(m).input.size for m in members], **options)
    if family == "custom" and ref in CUSTOM_BUILDERS:
        return CUSTOM_BUILDERS[ref](num_out, input_spec, **options)
    raise ValueError(f"{spec.name}: unknown architecture {spec.arch!r}")


def get_model(
    name: str,
    num_classes: int = 2,
    weights: str = "none",
    input_spec: InputSpec | None = None,
    **options: Any,
) -> nn.Module:
    """Build a registered model with `num_outputs(num_classes)` outputs.

    `weights`: "none", "pretrained" or a file path (see module docstring). `input_spec`
    overrides the entry's (e.g. a smaller size for a small CNN). `options` go to the
    constructor (e.g. `dropout=0.5` for `cnn_dropout`).
    """
    spec = get_spec(name)
    unknown = set(options) - set(spec.options) if spec.options or options else set()
    if spec.family == "timm":
        unknown = set()  # timm takes its own keyword arguments (drop_rate, ...)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; valid: {sorted(spec.options)}")
    model = build(spec, num_outputs(num_classes), input_spec, **options)
    if weights in ("none", "", None):
        return model
    if weights == "pretrained":
        state = load_pretrained_state(spec)
    elif os.path.exists(str(weights)):
        state = load_state_file(str(weights))
    else:
        raise WeightsUnavailable(
            f"{name}: weights={weights!r} is neither 'none', 'pretrained' nor an existing file"
        )
    load_backbone(model, state, spec.head, source=str(weights))
    return model


def load_pretrained_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The entry's pretrained state dict, from local caches or packages only."""
    if spec.family == "ensemble":  # each member's own weights, under members.<i>.
        state: dict[str, torch.Tensor] = {}
        for i, member in enumerate(spec.members):
            member_spec = get_spec(member)
            for key, value in load_pretrained_state(member_spec).items():
                if not key.startswith(member_spec.head + "."):
                    state[f"members.{i}.{key}"] = value
        return state
    path = locate_pretrained(spec)
    if spec.weights_source.startswith("package:"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return _map_in_order(raw, spec)
    return load_state_file(path)


def _map_in_order(raw: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Map a state dict key-by-key, in order, onto the timm model's own keys (shapes must agree)."""
    reference = build(spec, 1000).state_dict()
    if len(raw) != len(reference):
        raise WeightsUnavailable(f"{spec.name}: packaged weights have {len(raw)} tensors, model has {len(reference)}")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(raw.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsUnavailable(f"{spec.name}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = tensor
    return out
