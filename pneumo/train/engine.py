"""The training engine: one epoch of the image loop, and one epoch of any loop gathered over
workers into the epoch's metrics row, for `pneumo.train.worker.train_func` (and tests, without Ray).

`run_epoch(ts, loop, train, val, number)` runs any `Loop`: `ImageLoop` here (image batches,
augmentation, two-stage fine-tuning) or `pneumo.train.feature_cache.FeatureLoop` (`cache_features`:
the frozen backbone's features once, then the head). Each loop's `run_epoch(train, val, number)`
returns train {loss, images, seconds} and eval {labels, probs, loss_sum, n}.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pneumo import precision as P
from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.models.finetune import set_train_mode
from pneumo.models.graph import probabilities as logits_to_probs
from pneumo.report.metrics import split_metrics
from pneumo.train.augment import Augment
from pneumo.train.parts import TrainState, compute_loss

log = logging.getLogger(__name__)


class Loop(Protocol):
    """One epoch of training and evaluation on this worker's shards."""

    def run_epoch(self, train: Any, val: Any, number: int) -> tuple[dict[str, float], dict[str, Any]]: ...


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
    ema: Any = None,
    equalize: str = "none",
) -> dict[str, float]:
    """One pass over `batches` ({image: uint8[B, S, S], label: int[B]}); returns loss, images, seconds.
    `ema` (an AveragedModel) follows every step; `equalize` is the model's mode, applied after the
    augmentation to batches read un-equalised (`Augment.raw_spec`)."""
    total, n, steps = 0.0, 0, 0
    start = time.perf_counter()
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        if len(labels) < 2:  # a batch of one breaks batch norm; shards are equal, so every worker skips it
            continue
        if not isinstance(images, torch.Tensor):
            images, labels = torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(labels))
        if augment is not None and augment.enabled:
            images = augment(images, generator, equalize)
        x = to_tensor(images, spec, device=device, channels_last=channels_last)
        y = labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with P.autocast(device, precision):
            logits = model(x)
        loss = compute_loss(loss_fn, logits, y, num_classes)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
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
        with P.autocast(device, precision):
            logits = model(x)
        loss_sum += float(compute_loss(loss_fn, logits, y, num_classes)) * len(y)
        n += len(y)
        labels_out.append(labels.cpu().numpy().astype(np.int64))
        probs_out.append(logits_to_probs(logits, num_classes).cpu().numpy())
    probs = np.concatenate(probs_out) if probs_out else np.zeros((0, num_classes), np.float32)
    labels_arr = np.concatenate(labels_out) if labels_out else np.zeros((0,), np.int64)
    return {"labels": labels_arr, "probs": probs.astype(np.float32), "loss_sum": loss_sum, "n": n}


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
        equalize = ts.spec.equalize if self.augment.raw_spec(ts.spec) != ts.spec else "none"
        tr = train_one_epoch(ts.trainable, batches, ts.optimizer, ts.loss_fn, ts.spec, ts.num_classes, ts.device,
                             ts.precision, self.augment, ts.generator, cfg.max_steps_per_epoch, cfg.channels_last,
                             ts.scaler, ts.ema, equalize)
        ev = evaluate(ts.evaluated, val.iter_torch_batches(batch_size=max(cfg.batch_size, 64)), ts.loss_fn, ts.spec,
                      ts.num_classes, ts.device, ts.precision, cfg.channels_last)
        return tr, ev


def gather(obj: Any, world: int) -> list[Any]:
    """`obj` from every worker (all_gather_object), or `[obj]` alone."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def run_epoch(ts: TrainState, loop: Loop, train: Any, val: Any, number: int) -> dict[str, Any]:
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
    m = split_metrics(labels, probs, ts.classes)
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
