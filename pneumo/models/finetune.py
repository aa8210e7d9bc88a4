"""Fine-tuning: which parameters train (`head`, `partial`: the head and the last N feature
blocks, `full`), and train mode that keeps frozen batch norms frozen."""

from __future__ import annotations

from torch import nn

from pneumo.models.zoo import FINETUNE_MODES, get_spec


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
        # an ensemble (`pneumo.models.ensemble.FeatureEnsemble`) unfreezes the last blocks of every member
        members = list(model.members) if isinstance(getattr(model, "members", None), nn.ModuleList) else [model]
        for member in members:
            for block in feature_blocks(member, head if member is model else "classifier")[-n_blocks:]:
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
