"""The training engine: one epoch of either loop, the loss/optimizer/schedule builders and the
epoch metrics, for `pneumo.train_worker.train_func` (and tests, without Ray).

`make_loop(ts).run_epoch(train, val, number) -> (train, eval)` hides which loop runs: `ImageLoop`
(image batches, augmentation, two-stage fine-tuning) or `pneumo.feature_cache.FeatureLoop`
(`cache_features`: the frozen backbone's features once, then the head). Both return train {loss, images, seconds} and eval
{labels, probs, loss_sum, n}; `run_epoch` gathers them over workers into the epoch's metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pneumo import precision as P
from pneumo.augment import Augment
from pneumo.config import ConfigError
from pneumo.export import probabilities as logits_to_probs
from pneumo.metrics import negative_index, positive_score
from pneumo.models import set_finetune, set_train_mode
from pneumo.preprocess import InputSpec, to_tensor

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from pneumo.feature_cache import FeatureLoop
    from pneumo.training import TrainConfig

OPTIMIZERS = ("adam", "adamw", "adamax", "rmsprop", "sgd")
SCHEDULERS = ("none", "plateau", "cosine")


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


def make_loss(num_classes: int, class_weights: list[float] | None = None) -> nn.Module:
    """One logit + BCE for binary tasks (pos_weight = w1 / w0), softmax CE otherwise."""
    if num_classes == 2:
        pos_weight = torch.tensor([class_weights[1] / class_weights[0]]) if class_weights else None
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    return nn.CrossEntropyLoss(weight=weight)


def compute_loss(loss_fn: nn.Module, logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = logits.float()
    if num_classes == 2:
        return loss_fn(logits.reshape(-1), labels.float())
    return loss_fn(logits, labels.long())


def class_weights_for(counts: dict[str, int], classes: list[str]) -> list[float]:
    """Inverse-frequency weights n / (k * n_c), as sklearn's `class_weight="balanced"`."""
    total = sum(counts.get(c, 0) for c in classes)
    return [total / (len(classes) * max(1, counts.get(c, 0))) for c in classes]


def precision_for(cfg_precision: str, device: torch.device) -> str:
    """Training's precision: `auto` is bf16 where native, fp16 (with a GradScaler) on other GPUs, else fp32."""
    return P.resolve(cfg_precision, device, training=True)


_autocast = P.autocast


def train_one_epoch(
    model: nn.Module,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    spec: InputSpec,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    max_steps: int = 0,
    channels_last: bool = True,
    scaler: Any = None,
) -> dict[str, float]:
    """One pass over `batches` ({image: uint8[B, S, S], label: int[B]}); returns loss, images, seconds."""
    total, n, steps = 0.0, 0, 0
    start = time.perf_counter()
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        if len(labels) < 2:  # a batch of one breaks batch norm; shards are equal, so every worker skips it
            continue
        if not isinstance(images, torch.Tensor):
            images, labels = torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(labels))
        if augment is not None and augment.enabled:
            images = augment(images, generator)
        x = to_tensor(images, spec, device=device, channels_last=channels_last)
        y = labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            logits = model(x)
        loss = compute_loss(loss_fn, logits, y, num_classes)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        steps += 1
        if max_steps and steps >= max_steps:
            break
    return {"loss": total / max(1, n), "images": float(n), "seconds": time.perf_counter() - start}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Any,
    loss_fn: nn.Module,
    spec: InputSpec,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = True,
) -> dict[str, Any]:
    """Predictions over `batches`: {labels int[N], probs float32[N, K], loss_sum, n}."""
    model.eval()
    labels_out, probs_out, loss_sum, n = [], [], 0.0, 0
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        if not isinstance(images, torch.Tensor):
            images, labels = torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(labels))
        x = to_tensor(images, spec, device=device, channels_last=channels_last)
        y = labels.to(device)
        with _autocast(device, precision):
            logits = model(x)
        loss_sum += float(compute_loss(loss_fn, logits, y, num_classes)) * len(y)
        n += len(y)
        labels_out.append(labels.cpu().numpy().astype(np.int64))
        probs_out.append(logits_to_probs(logits, num_classes).cpu().numpy())
    probs = np.concatenate(probs_out) if probs_out else np.zeros((0, num_classes), np.float32)
    labels_arr = np.concatenate(labels_out) if labels_out else np.zeros((0,), np.int64)
    return {"labels": labels_arr, "probs": probs.astype(np.float32), "loss_sum": loss_sum, "n": n}


def is_positive(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """1 for any class but NORMAL (the question the threshold answers), else 0."""
    return (np.asarray(labels) != negative_index(classes)).astype(np.int64)


def epoch_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float = 0.5) -> dict[str, float]:
    """val AUC / accuracy / sensitivity / specificity of the positive score at `threshold`."""
    from pneumo.metrics import binary_metrics

    y = is_positive(labels, classes)
    m = binary_metrics(y, positive_score(probs, classes), threshold)
    out = {k: float(m[k]) for k in ("auc", "accuracy", "sensitivity", "specificity") if m.get(k) is not None}
    if len(classes) > 2 and len(labels):
        out["class_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
    return out


def choose_threshold(labels: np.ndarray, probs: np.ndarray, classes: list[str], method: str, target: float) -> dict:
    """The bundle's threshold dict, chosen on these (validation) predictions."""
    from pneumo.metrics import choose_threshold as _choose

    y, score = is_positive(labels, classes), positive_score(probs, classes)
    if method == "target_sensitivity":
        value = _choose(y, score, method="target_sensitivity", target=target)
        return {"value": float(value), "method": method, "target": float(target)}
    return {"value": float(_choose(y, score, method="youden")), "method": method, "target": None}


# ---------------------------------------------------------------- one epoch, either loop


def _same(module: nn.Module) -> nn.Module:
    return module


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class TrainState:
    """Everything one worker's loop needs (built by `pneumo.train_worker.setup_training`).

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def stage_for(self, epoch: int) -> str:
        """'head' for the first `head_epochs` epochs (0-based `epoch`), then `finetune`."""
        return "head" if epoch < self.cfg.head_epochs else self.cfg.finetune

    def set_stage(self, stage: str) -> None:
        """Freeze/unfreeze for `stage` and (re-)wrap: DDP tracks the trainable set."""
        self.stage = stage
        set_finetune(self.model, self.cfg.model, stage, self.cfg.n_blocks)
        self.trainable = self.wrap(self.model.get_classifier() if self.cfg.cache_features else self.model)


class ImageLoop:
    """The model on image batches from a Ray Data shard (anything with `iter_torch_batches`)."""

    def __init__(self, ts: TrainState):
        self.ts, self.augment = ts, ts.cfg.augment()

    def run_epoch(self, train: Any, val: Any, number: int) -> tuple[dict[str, float], dict[str, Any]]:
        ts, cfg = self.ts, self.ts.cfg
        if ts.stage_for(number - 1) != ts.stage:
            ts.set_stage(ts.stage_for(number - 1))
        set_train_mode(ts.model)
        batches = train.iter_torch_batches(batch_size=cfg.batch_size,
                                           local_shuffle_buffer_size=max(4 * cfg.batch_size, 256),
                                           local_shuffle_seed=cfg.seed + number)
        tr = train_one_epoch(ts.trainable, batches, ts.optimizer, ts.loss_fn, ts.spec, ts.num_classes, ts.device,
                             ts.precision, self.augment, ts.generator, cfg.max_steps_per_epoch, cfg.channels_last,
                             ts.scaler)
        ev = evaluate(ts.model, val.iter_torch_batches(batch_size=max(cfg.batch_size, 64)), ts.loss_fn, ts.spec,
                      ts.num_classes, ts.device, ts.precision, cfg.channels_last)
        return tr, ev


def make_loop(ts: TrainState) -> ImageLoop | FeatureLoop:
    from pneumo.feature_cache import FeatureLoop  # lazy: pneumo.feature_cache imports this module

    return FeatureLoop(ts) if ts.cfg.cache_features else ImageLoop(ts)


def gather(obj: Any, world: int) -> list[Any]:
    """`obj` from every worker (all_gather_object), or `[obj]` alone."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def run_epoch(ts: TrainState, loop: ImageLoop | FeatureLoop, train: Any, val: Any, number: int) -> dict[str, Any]:
    """Epoch `number` (1-based) on this worker: train + evaluate, gathered over all workers into
    the metrics row, which is appended to `ts.state["history"]`; early stopping on val loss, best
    epoch by val AUC, scheduler step. `ts.state["stopped"]` says whether to stop."""
    cfg, state = ts.cfg, ts.state
    ts.generator.manual_seed(cfg.seed * 1000 + ts.rank * 100 + number)
    tr, ev = loop.run_epoch(train, val, number)
    parts = gather({"labels": ev["labels"], "probs": ev["probs"], "loss_sum": ev["loss_sum"], "n": ev["n"],
                    "train": tr}, ts.world)
    labels = np.concatenate([p["labels"] for p in parts])
    probs = np.concatenate([p["probs"] for p in parts])
    n_val = sum(p["n"] for p in parts)
    val_loss = sum(p["loss_sum"] for p in parts) / max(1, n_val)
    train_images = sum(p["train"]["images"] for p in parts)
    train_loss = sum(p["train"]["loss"] * p["train"]["images"] for p in parts) / max(1.0, train_images)
    seconds = max(p["train"]["seconds"] for p in parts)
    m = epoch_metrics(labels, probs, ts.classes)
    metrics: dict[str, Any] = {
        "epoch": number, "train_loss": train_loss, "val_loss": val_loss,
        **{f"val_{key}": value for key, value in m.items()},
        "lr": float(ts.optimizer.param_groups[0]["lr"]), "stage": ts.stage,
        "train_images": int(train_images), "train_seconds": seconds,
        "train_images_per_s": train_images / seconds if seconds > 0 else 0.0, "val_images": int(n_val),
    }
    metrics.setdefault("val_auc", float("nan"))
    # early stopping on val loss; best model by val AUC (CheckpointConfig)
    if val_loss < state["best_val_loss"] - cfg.min_delta:
        state["best_val_loss"], state["bad_epochs"] = val_loss, 0
    else:
        state["bad_epochs"] += 1
    auc = metrics["val_auc"]
    if not math.isnan(auc) and auc > state["best_auc"]:
        state["best_auc"], state["best_epoch"] = auc, number
    if ts.scheduler is not None:
        ts.scheduler.step(val_loss) if cfg.scheduler == "plateau" else ts.scheduler.step()
    stop = bool(cfg.patience) and state["bad_epochs"] >= cfg.patience
    state.update(epoch=number, stopped=stop)
    state["history"].append(metrics)
    metrics["early_stopped"] = stop
    return metrics


def progress_line(m: dict[str, Any], epochs: int) -> str:
    def f(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    return (f"[pneumo train] epoch {m['epoch']}/{epochs} ({m['stage']}) train_loss {f('train_loss')} "
            f"val_loss {f('val_loss')} auc {f('val_auc')} acc {f('val_accuracy')} sens {f('val_sensitivity')} "
            f"spec {f('val_specificity')} lr {m['lr']:.2e} {m['train_images_per_s']:.1f} img/s")
