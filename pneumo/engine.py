"""The training engine: one epoch of either loop, the loss/optimizer/schedule builders and the
epoch metrics, for `pneumo.training.train_func` (and tests, without Ray).

`make_loop(ts).run_epoch(train, val, number) -> (train, eval)` hides which loop runs: `ImageLoop`
(image batches, augmentation, two-stage fine-tuning) or `FeatureLoop` (`cache_features`: the frozen
backbone's features once, then the head). Both return train {loss, images, seconds} and eval
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

from pneumo import logs
from pneumo import precision as P
from pneumo.augment import Augment
from pneumo.config import ConfigError
from pneumo.export import probabilities as logits_to_probs
from pneumo.metrics import negative_index, positive_score
from pneumo.models import set_finetune, set_train_mode
from pneumo.preprocess import InputSpec, to_tensor

log = logging.getLogger(__name__)

if TYPE_CHECKING:
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


@torch.inference_mode()
def backbone_features(model: nn.Module, batches: Any, spec: InputSpec, device: torch.device,
                      precision: str = "fp32", channels_last: bool = True, model_name: str | None = None,
                      threads: int = 0, num_classes: int = 2,
                      tta: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of a frozen model over `batches`: (float32[N, F], int64[N]).

    On CPU at fp32, with `model_name` given, they come from ONNX Runtime running the same scoring
    graph bundles carry (its `features` output), checked against torch on the first batch; on a
    GPU, or where the export or the check fails (logged), from eager torch.
    """
    model.eval()
    session = _feature_session(model, model_name, num_classes, spec, threads, tta) if (
        model_name and device.type == "cpu" and precision == "fp32") else None
    feats, labels = [], []
    for batch in batches:
        x = to_tensor(batch["image"], spec, device=device, channels_last=channels_last and session is None)
        if session is not None:
            from pneumo.export import run_session

            f = torch.from_numpy(run_session(session, x.numpy())[1])
            if not feats and not _features_agree(model, x, f, precision, device, tta):
                session = None
        if session is None:
            f = _torch_features(model, x, precision, device, tta)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long().cpu())
    if not feats:
        return torch.zeros((0, 0)), torch.zeros((0,), dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _feature_session(model: nn.Module, model_name: str, num_classes: int, spec: InputSpec, threads: int,
                     tta: tuple[str, ...] = ()) -> Any:
    from pneumo.export import ExportError, export_onnx, ort_session, scoring_module

    try:
        graph = scoring_module(model, model_name, num_classes, tta)
        return ort_session(export_onnx(graph, spec), threads)
    except (ExportError, ImportError, ValueError) as exc:
        log.warning("feature cache: ONNX Runtime unavailable, eager torch instead (%s)", exc)
        return None


def _torch_features(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device,
                    tta: tuple[str, ...] = ()) -> torch.Tensor:
    """Eager pooled features; with hflip TTA the mean of the image's and its mirror's (as the graph does)."""
    with torch.inference_mode(), _autocast(device, precision):
        f = model.forward_head(model.forward_features(x), pre_logits=True).float()
        if "hflip" in tta:
            f = (f + model.forward_head(model.forward_features(torch.flip(x, dims=[3])), pre_logits=True).float()) / 2
    return f


def _features_agree(model: nn.Module, x: torch.Tensor, got: torch.Tensor, precision: str,
                    device: torch.device, tta: tuple[str, ...] = ()) -> bool:
    ref = _torch_features(model, x, precision, device, tta)
    ok = bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-4))
    if not ok:
        log.warning("feature cache: ONNX Runtime features differ from torch by %.2e; eager torch instead",
                    float((got - ref).abs().max()))
    return ok


def reestimate_batchnorm(ts: Any, batches: Any, limit: int) -> None:
    """Batch-norm statistics of the frozen backbone re-estimated on up to `limit` training X-rays
    (AdaBN on the training domain), then averaged over the workers so every replica agrees."""
    from pneumo.drift import adapt_batchnorm

    def inputs() -> Any:
        seen = 0
        for batch in batches:
            if seen >= limit:
                return
            x = to_tensor(batch["image"][: limit - seen], ts.spec, device=ts.device)
            seen += len(x)
            yield x

    adapt_batchnorm(ts.model, inputs())
    if ts.world > 1:
        import torch.distributed as dist

        for m in ts.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for t in (m.running_mean, m.running_var):
                    dist.all_reduce(t)
                    t /= ts.world


def train_head_epoch(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                     loss_fn: nn.Module, num_classes: int, batch_size: int, generator: torch.Generator,
                     dropout: float = 0.0, max_steps: int = 0) -> dict[str, float]:
    """One epoch of the classifier head on cached features (shuffled, dropout as in the model's head)."""
    head.train()
    start, total, n = time.perf_counter(), 0.0, 0
    order = torch.randperm(len(feats), generator=generator)
    device = next(head.parameters()).device
    steps = max(1, len(feats) // batch_size) if len(feats) > 1 else 0  # equal shards: same steps everywhere
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        x = nn.functional.dropout(feats[idx].to(device), p=dropout, training=True)
        y = labels[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(loss_fn, head(x), y, num_classes)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        if max_steps and step + 1 >= max_steps:
            break
    return {"loss": total / max(1, n), "images": float(n), "seconds": time.perf_counter() - start}


@torch.inference_mode()
def evaluate_head(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                  num_classes: int) -> dict[str, Any]:
    """`evaluate` on cached features."""
    head.eval()
    device = next(head.parameters()).device
    logits = head(feats.to(device)) if len(feats) else torch.zeros((0, 1 if num_classes == 2 else num_classes))
    loss_sum = float(compute_loss(loss_fn, logits, labels.to(device), num_classes)) * len(labels) if len(labels) else 0.0
    return {"labels": labels.numpy().astype(np.int64), "probs": logits_to_probs(logits, num_classes).cpu().numpy(),
            "loss_sum": loss_sum, "n": len(labels)}


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
    """Everything one worker's loop needs (built by `pneumo.training.setup_training`).

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


class FeatureLoop:
    """`cache_features`: the frozen backbone's features once (first epoch), then the head on them."""

    def __init__(self, ts: TrainState):
        self.ts, self.cache = ts, {}

    def run_epoch(self, train: Any, val: Any, number: int) -> tuple[dict[str, float], dict[str, Any]]:
        ts, cfg = self.ts, self.ts.cfg
        if not self.cache:
            t0 = time.perf_counter()
            if cfg.bn_images:
                reestimate_batchnorm(ts, train.iter_torch_batches(batch_size=64), cfg.bn_images)
            tta = () if cfg.tta == "none" else (cfg.tta,)
            for name, shard in (("train", train), ("val", val)):
                self.cache[name] = backbone_features(ts.model, shard.iter_torch_batches(batch_size=64), ts.spec,
                                                     ts.device, ts.precision, cfg.channels_last, cfg.model,
                                                     cfg.threads or cfg.cpus_per_worker, ts.num_classes, tta)
            if ts.rank == 0:
                logs.worker_line(f"[pneumo train] cached backbone features of {len(self.cache['train'][0])} train "
                                 f"and {len(self.cache['val'][0])} val images per worker in "
                                 f"{time.perf_counter() - t0:.0f}s")
        tr = train_head_epoch(ts.trainable, *self.cache["train"], ts.optimizer, ts.loss_fn, ts.num_classes,
                              cfg.batch_size, ts.generator, float(getattr(ts.model, "drop_rate", 0.0)),
                              cfg.max_steps_per_epoch)
        ev = evaluate_head(unwrap(ts.trainable), *self.cache["val"], ts.loss_fn, ts.num_classes)
        return tr, ev


def make_loop(ts: TrainState) -> ImageLoop | FeatureLoop:
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
