"""The parts of one training worker: optimizer, schedule and loss builders, and `TrainState`,
everything a loop needs (`pneumo.train.engine.ImageLoop`, `pneumo.train.feature_cache.FeatureLoop`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pneumo import precision as P
from pneumo.config import ConfigError
from pneumo.io.preprocess import InputSpec
from pneumo.models.finetune import set_finetune
from pneumo.train.config import OPTIMIZERS, TrainConfig


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise ConfigError(f"optimizer={cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    return None


class SmoothedBCE(nn.BCEWithLogitsLoss):
    """BCE with logits whose 0/1 targets are moved `smoothing / 2` toward 0.5 (torch's BCE has no
    label smoothing of its own; its CrossEntropyLoss does, and k-class tasks use that)."""

    def __init__(self, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0):
        super().__init__(pos_weight=pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, target * (1 - self.smoothing) + self.smoothing / 2)


def make_loss(num_classes: int, class_weights: list[float] | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """One logit + BCE for binary tasks (pos_weight = w1 / w0), softmax CE otherwise; targets
    smoothed by `label_smoothing`."""
    if num_classes == 2:
        pos_weight = torch.tensor([class_weights[1] / class_weights[0]]) if class_weights else None
        return SmoothedBCE(pos_weight=pos_weight, smoothing=label_smoothing)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def compute_loss(loss_fn: nn.Module, logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = logits.float()
    if num_classes == 2:
        return loss_fn(logits.reshape(-1), labels.float())
    return loss_fn(logits, labels.long())


def make_ema(model: nn.Module, decay: float) -> Any:
    """An exponential moving average of `model`'s weights and buffers (torch's `AveragedModel`), or None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def class_weights_for(counts: dict[str, int], classes: list[str]) -> list[float]:
    """Inverse-frequency weights n / (k * n_c), as sklearn's `class_weight="balanced"`."""
    total = sum(counts.get(c, 0) for c in classes)
    return [total / (len(classes) * max(1, counts.get(c, 0))) for c in classes]


def precision_for(cfg_precision: str, device: torch.device) -> str:
    """Training's precision: `auto` is bf16 where native, fp16 (with a GradScaler) on other GPUs, else fp32."""
    return P.resolve(cfg_precision, device, training=True)


def _same(module: nn.Module) -> nn.Module:
    return module


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class TrainState:
    """Everything one worker's loop needs (built by `pneumo.train.worker.setup_training`).

    `trainable` is what the optimizer steps, wrapped by `wrap` (Ray's `prepare_model` -> DDP on
    workers, identity in tests): the whole model, or only its classifier with `cache_features`.
    `state` holds the counters/history saved in every checkpoint.
    """

    cfg: TrainConfig
    classes: list[str]
    spec: InputSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    scaler: Any
    device: torch.device
    precision: str
    state: dict[str, Any]
    rank: int = 0
    world: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _same
    stage: str = ""
    trainable: nn.Module | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    ema: Any = None  # torch AveragedModel when cfg.ema: what is evaluated, checkpointed and exported

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and exported: the moving average with `ema`, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def stage_for(self, epoch: int) -> str:
        """'head' for the first `head_epochs` epochs (0-based `epoch`), then `finetune`."""
        return "head" if epoch < self.cfg.head_epochs else self.cfg.finetune

    def set_stage(self, stage: str) -> None:
        """Freeze/unfreeze for `stage` and (re-)wrap: DDP tracks the trainable set."""
        self.stage = stage
        set_finetune(self.model, self.cfg.model, stage, self.cfg.n_blocks)
        self.trainable = self.wrap(self.model.get_classifier() if self.cfg.cache_features else self.model)
