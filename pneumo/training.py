"""`pneumo train`: distributed training with Ray Train, exported as a model bundle.

    pneumo train DATA --out runs/demo [--config ray_jobs/recipes/seed_cnn.yaml] [--epochs 3 ...]

Flow: `pneumo.data.labelled_splits` (val/test carved by patient when missing) ->
`pneumo.ingest.build_datasets` (Ray Data, shared preprocessing, bad files reported) ->
`TorchTrainer(train_func)` on `num_workers` workers (CPU by default, `--gpus-per-worker` for
GPU with AMP + channels_last), each consuming its `get_dataset_shard("train")` with on-the-fly
augmentation -> per-epoch `ray.train.report` of val loss / accuracy / AUC / sensitivity /
specificity with a rank-0 checkpoint (safetensors + JSON, best kept by val AUC) -> the best
checkpoint becomes `<out>/bundle` with a threshold chosen on validation predictions only ->
`<out>/config.yaml`, `<out>/summary.json` and the evaluation report under `<out>/report/`.

Re-running with the same `name` and `storage_path` resumes from the latest checkpoint
(Ray Train restores its checkpoint manager from the run folder and `ray.train.get_checkpoint()`
hands it to the workers); a worker failure restarts the group from the latest checkpoint
(`FailureConfig(max_failures)`), so epochs are neither repeated nor skipped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumo.augment import Augment
from pneumo.config import ConfigError, from_dict, parse_config, save_config, to_dict
from pneumo.data import LABEL_SETS, fingerprint, is_s3, labelled_splits, resolve_filesystem
from pneumo.metrics import THRESHOLD_METHODS, negative_index, positive_score
from pneumo.models import (
    FINETUNE_MODES,
    get_model,
    get_spec,
    list_models,
    set_finetune,
    set_train_mode,
)
from pneumo import precision as P
from pneumo.export import probabilities as logits_to_probs
from pneumo.predict import Predictor
from pneumo.preprocess import EQUALIZE_MODES, InputSpec, to_tensor

OPTIMIZERS = ("adam", "adamw", "adamax", "rmsprop", "sgd")
SCHEDULERS = ("none", "plateau", "cosine")
BALANCE = ("none", "weighted_loss", "oversample")
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.json"
OPTIM_FILE = "optim.pt"


@dataclass
class TrainConfig:
    """Train a pneumonia classifier with Ray Train and export a model bundle."""

    data: str = field(metadata={"positional": True, "help": "labelled data: folder or s3:// prefix with train/<CLASS>/"})
    out: str = field(default="runs/train", metadata={"help": "run folder: bundle, config.yaml, report"})
    name: str = field(default="", metadata={"help": "run name (same name + storage_path resumes); default: out's folder name"})
    storage_path: str = field(default="", metadata={"help": "Ray Train storage (folder or s3://); default: <out>/ray_results"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint, e.g. http://127.0.0.1:8333"})
    model: str = field(default="efficientnet_lite0", metadata={"choices": list_models(), "help": "registered model"})
    weights: str = field(default="pretrained", metadata={"help": "none | pretrained | PATH (.safetensors)"})
    image_size: int = field(default=0, metadata={"help": "input size override (0: the model's own)"})
    equalize: str = field(default="", metadata={"choices": ["", *EQUALIZE_MODES], "help": "intensity equalisation override"})
    label_set: str = field(default="binary", metadata={"choices": list(LABEL_SETS), "help": "binary or three_class"})
    optimizer: str = field(default="adam", metadata={"choices": list(OPTIMIZERS)})
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = field(default=0.9, metadata={"help": "sgd momentum / rmsprop momentum"})
    scheduler: str = field(default="none", metadata={"choices": list(SCHEDULERS)})
    plateau_factor: float = 0.3
    plateau_patience: int = 2
    min_lr: float = 1e-6
    epochs: int = 10
    batch_size: int = field(default=32, metadata={"help": "batch size per worker"})
    patience: int = field(default=5, metadata={"help": "early stopping: epochs without val-loss improvement (0: off)"})
    min_delta: float = 0.0
    balance: str = field(default="none", metadata={"choices": list(BALANCE)})
    finetune: str = field(default="full", metadata={"choices": list(FINETUNE_MODES)})
    n_blocks: int = field(default=2, metadata={"help": "feature blocks unfrozen by finetune=partial"})
    head_epochs: int = field(default=0, metadata={"help": "two-stage: first N epochs train the head only"})
    rotation: float = field(default=0.0, metadata={"help": "augmentation: max rotation in degrees"})
    shift: float = field(default=0.0, metadata={"help": "augmentation: max shift, fraction of the side"})
    zoom: float = field(default=0.0, metadata={"help": "augmentation: zoom range"})
    hflip: bool = field(default=False, metadata={"help": "augmentation: random horizontal flip"})
    val_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0
    num_workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = field(default=0.0, metadata={"help": "> 0 trains on GPU with AMP"})
    threads: int = field(default=0, metadata={"help": "torch threads per worker (0: cpus_per_worker)"})
    precision: str = field(default="auto", metadata={"choices": list(P.TORCH_PRECISIONS_AUTO), "help": "auto: bf16 where native"})
    channels_last: bool = True
    threshold_method: str = field(default="target_sensitivity", metadata={"choices": list(THRESHOLD_METHODS)})
    target_sensitivity: float = 0.95
    cache_features: bool = field(default=False, metadata={
        "help": "finetune=head on a timm model: compute the frozen backbone's features once, then train the head"})
    max_steps_per_epoch: int = field(default=0, metadata={"help": "cap on training steps per epoch (0: all)"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts allowed"})
    num_to_keep: int = field(default=2, metadata={"help": "checkpoints kept (best by val AUC)"})
    report: bool = field(default=True, metadata={"help": "write the evaluation report and plots"})
    fail_at_epoch: int = field(default=0, metadata={"help": "tests only: last worker exits at this epoch once"})
    fail_marker: str = field(default="", metadata={"help": "tests only: marker file making the failure one-shot"})

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("epochs, batch_size and num_workers must be >= 1")
        if not 0 <= self.head_epochs < self.epochs and self.head_epochs:
            raise ConfigError(f"head_epochs={self.head_epochs} must be < epochs={self.epochs}")
        if not 0 < self.target_sensitivity < 1:
            raise ConfigError(f"target_sensitivity={self.target_sensitivity} must be in (0, 1)")
        if self.lr < 0 or self.weight_decay < 0:
            raise ConfigError("lr and weight_decay must be >= 0")
        if self.image_size and self.image_size < 16:
            raise ConfigError(f"image_size={self.image_size}: need >= 16 (0 keeps the model's)")
        if self.cache_features and (self.finetune != "head" or self.head_epochs or self.augment().enabled):
            raise ConfigError("cache_features needs finetune=head, head_epochs=0 and no augmentation "
                              "(rotation/shift/zoom/hflip all off): the backbone must be frozen and its input fixed")
        if self.cache_features and get_spec(self.model).weights_source.split(":")[0] not in ("timm", "package"):
            raise ConfigError(f"cache_features works with timm models (forward_features/forward_head); "
                              f"{self.model} is not one")
        self.augment()

    # derived ------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or Path(self.out.rstrip("/")).name or "pneumo-train"

    @property
    def storage(self) -> str:
        return self.storage_path or os.path.abspath(os.path.join(self.out, "ray_results"))

    def input_spec(self) -> InputSpec:
        spec = get_spec(self.model).input
        changes: dict[str, Any] = {}
        if self.image_size:
            changes["size"] = self.image_size
        if self.equalize:
            changes["equalize"] = self.equalize
        return spec.replace(**changes) if changes else spec

    def augment(self) -> Augment:
        return Augment(self.rotation, self.shift, self.zoom, self.hflip)


# ---------------------------------------------------------------- building blocks


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


def _precision_for(cfg_precision: str, device: torch.device) -> str:
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
                      precision: str = "fp32", channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of a frozen timm model over `batches`: (float32[N, F], int64[N])."""
    model.eval()
    feats, labels = [], []
    for batch in batches:
        x = to_tensor(batch["image"], spec, device=device, channels_last=channels_last)
        with _autocast(device, precision):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long().cpu())
    if not feats:
        return torch.zeros((0, 0)), torch.zeros((0,), dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


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


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any]) -> None:
    """Weights as safetensors, counters/history as JSON, optimizer/scheduler state via torch.save
    (our own files only; read back with `weights_only=True`)."""
    from pneumo.bundle import weights_bytes

    Path(directory, WEIGHTS_FILE).write_bytes(weights_bytes(model))
    Path(directory, STATE_FILE).write_text(json.dumps(state, indent=1))
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None},
               os.path.join(directory, OPTIM_FILE))


def read_state(directory: str) -> dict[str, Any]:
    return json.loads(Path(directory, STATE_FILE).read_text())


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, WEIGHTS_FILE))


def _ckpt_epoch(checkpoint: Any) -> int:
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
            return int(json.loads(f.read())["epoch"])
    except (OSError, KeyError, ValueError):
        return -1


def latest_checkpoint(given: Any, storage: str | None, run_name: str, s3_endpoint: str | None = None) -> Any:
    """The newer of Ray's `get_checkpoint()` and the newest complete `epoch_NNNN` folder this run wrote.

    Ray Train restores the latest *registered* checkpoint; when a worker dies right after a report,
    the controller can see the failure before it registers that report's checkpoint, and the group
    would silently repeat an epoch. Our own checkpoints are named by epoch, so the run folder tells
    us the truth.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    best, best_epoch = given, _ckpt_epoch(given) if given is not None else -1
    if not storage:
        return best
    fs, root = resolve_filesystem(storage, s3_endpoint)
    run_dir = f"{root.rstrip('/')}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return best
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("epoch_")), reverse=True)
    for name in names:
        path = f"{run_dir}/{name}"
        files = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
        if {WEIGHTS_FILE, STATE_FILE, OPTIM_FILE} <= files:
            candidate = Checkpoint(path=path, filesystem=fs)
            epoch = _ckpt_epoch(candidate)
            if epoch > best_epoch:
                best, best_epoch = candidate, epoch
            break
    return best


# ---------------------------------------------------------------- the Ray Train loop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _gather(obj: Any, world: int) -> list[Any]:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop: `config` = {"cfg": TrainConfig as dict, "classes", "spec", "class_weights"}."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    classes: list[str] = list(config["classes"])
    spec = InputSpec.from_dict(config["spec"])
    k = len(classes)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.threads or cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    precision = _precision_for(cfg.precision, device)
    channels_last = cfg.channels_last

    model = get_model(cfg.model, k, weights=cfg.weights, input_spec=spec)
    final_mode = cfg.finetune
    set_finetune(model, cfg.model, final_mode, cfg.n_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    scheduler = make_scheduler(cfg, optimizer)
    loss_fn = make_loss(k, config.get("class_weights") if cfg.balance == "weighted_loss" else None).to(device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_loss": math.inf, "bad_epochs": 0,
                             "best_auc": -1.0, "best_epoch": 0, "stopped": False}
    checkpoint = latest_checkpoint(ray.train.get_checkpoint(), config.get("storage"), cfg.run_name,
                                   cfg.s3_endpoint)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_weights(d))
            state = read_state(d)
            opt = torch.load(os.path.join(d, OPTIM_FILE), map_location="cpu", weights_only=True)
            optimizer.load_state_dict(opt["optimizer"])
            if scheduler is not None and opt.get("scheduler"):
                scheduler.load_state_dict(opt["scheduler"])
        if rank == 0:
            print(f"[pneumo train] resuming after epoch {state['epoch']} from {checkpoint.path}", flush=True)

    state.setdefault("starts", []).append(state["epoch"])  # where each attempt began (resume/failure audit)

    def stage(epoch: int) -> str:
        return "head" if epoch < cfg.head_epochs else final_mode

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    current = stage(state["epoch"])
    set_finetune(model, cfg.model, current, cfg.n_blocks)
    if cfg.cache_features:  # only the head trains: DDP over its parameters alone
        ddp = ray.train.torch.prepare_model(model.get_classifier())
    else:
        ddp = ray.train.torch.prepare_model(model)
    augment = cfg.augment()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    cache: dict[str, Any] = {}

    for epoch in range(state["epoch"], cfg.epochs):
        if state.get("stopped"):
            break
        number = epoch + 1
        if cfg.fail_at_epoch == number and rank == world - 1 and cfg.fail_marker and not os.path.exists(cfg.fail_marker):
            Path(cfg.fail_marker).write_text(f"worker {rank} exited at epoch {number}\n")
            print(f"[pneumo train] test failure injection: rank {rank} exits at epoch {number}", flush=True)
            os._exit(1)
        if stage(epoch) != current and not cfg.cache_features:
            current = stage(epoch)
            set_finetune(model, cfg.model, current, cfg.n_blocks)
            ddp = ray.train.torch.prepare_model(model)  # re-wrap: DDP tracks the trainable set
        gen.manual_seed(cfg.seed * 1000 + rank * 100 + number)
        if cfg.cache_features:
            if not cache:
                t_feat = time.perf_counter()
                for name, shard in (("train", train_shard), ("val", val_shard)):
                    cache[name] = backbone_features(model, shard.iter_torch_batches(batch_size=64), spec, device,
                                                    precision, channels_last)
                if rank == 0:
                    print(f"[pneumo train] cached backbone features of {len(cache['train'][0])} train and "
                          f"{len(cache['val'][0])} val images per worker in {time.perf_counter() - t_feat:.0f}s",
                          flush=True)
            tr = train_head_epoch(ddp, *cache["train"], optimizer, loss_fn, k, cfg.batch_size, gen,
                                  float(getattr(model, "drop_rate", 0.0)), cfg.max_steps_per_epoch)
            ev = evaluate_head(_unwrap(ddp), *cache["val"], loss_fn, k)
        else:
            set_train_mode(model)
            batches = train_shard.iter_torch_batches(
                batch_size=cfg.batch_size, local_shuffle_buffer_size=max(4 * cfg.batch_size, 256),
                local_shuffle_seed=cfg.seed + number)
            tr = train_one_epoch(ddp, batches, optimizer, loss_fn, spec, k, device, precision, augment, gen,
                                 cfg.max_steps_per_epoch, channels_last, scaler)
            ev = evaluate(model, val_shard.iter_torch_batches(batch_size=max(cfg.batch_size, 64)), loss_fn, spec,
                          k, device, precision, channels_last)
        parts = _gather({"labels": ev["labels"], "probs": ev["probs"], "loss_sum": ev["loss_sum"], "n": ev["n"],
                         "train": tr}, world)
        labels = np.concatenate([p["labels"] for p in parts])
        probs = np.concatenate([p["probs"] for p in parts])
        n_val = sum(p["n"] for p in parts)
        val_loss = sum(p["loss_sum"] for p in parts) / max(1, n_val)
        train_images = sum(p["train"]["images"] for p in parts)
        train_loss = sum(p["train"]["loss"] * p["train"]["images"] for p in parts) / max(1.0, train_images)
        seconds = max(p["train"]["seconds"] for p in parts)
        m = epoch_metrics(labels, probs, classes)
        metrics: dict[str, Any] = {
            "epoch": number, "train_loss": train_loss, "val_loss": val_loss,
            **{f"val_{key}": value for key, value in m.items()},
            "lr": float(optimizer.param_groups[0]["lr"]), "stage": current,
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
        if scheduler is not None:
            scheduler.step(val_loss) if cfg.scheduler == "plateau" else scheduler.step()
        stop = bool(cfg.patience) and state["bad_epochs"] >= cfg.patience
        state.update(epoch=number, stopped=stop)
        state["history"].append(metrics)
        metrics["early_stopped"] = stop
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, model, optimizer, scheduler, state)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{number:04d}")
        if rank == 0:
            print(progress_line(metrics, cfg.epochs), flush=True)
        if stop:
            if rank == 0:
                print(f"[pneumo train] early stopping: val loss has not improved for {cfg.patience} epochs", flush=True)
            break


def progress_line(m: dict[str, Any], epochs: int) -> str:
    def f(key: str) -> str:
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    return (f"[pneumo train] epoch {m['epoch']}/{epochs} ({m['stage']}) train_loss {f('train_loss')} "
            f"val_loss {f('val_loss')} auc {f('val_auc')} acc {f('val_accuracy')} sens {f('val_sensitivity')} "
            f"spec {f('val_specificity')} lr {m['lr']:.2e} {m['train_images_per_s']:.1f} img/s")


# ---------------------------------------------------------------- driver


def _storage(cfg: TrainConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig; local paths are made absolute."""
    if is_s3(cfg.storage):
        fs, path = resolve_filesystem(cfg.storage, cfg.s3_endpoint)
        return path, fs
    return os.path.abspath(cfg.storage), None


def fit(cfg: TrainConfig, datasets: dict[str, Any], classes: list[str], spec: InputSpec,
        class_weights: list[float]) -> Any:
    """Run the TorchTrainer; returns the Ray Train `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(cfg)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": to_dict(cfg), "classes": classes, "spec": spec.to_dict(), "storage": cfg.storage,
                           "class_weights": class_weights},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="val_auc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": datasets["train"], "val": datasets["val"]},
    )
    return trainer.fit()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole job: data -> Ray Train -> bundle (+ val-chosen threshold) -> config, report, summary."""
    import ray

    from pneumo.bundle import save_bundle
    from pneumo.ingest import build_datasets, oversample, to_numpy

    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    classes = list(LABEL_SETS[cfg.label_set])
    spec = cfg.input_spec()
    records = labelled_splits(cfg.data, cfg.label_set, cfg.val_frac, cfg.test_frac, cfg.seed, cfg.s3_endpoint)
    if not any(r.split == "val" for r in records):
        raise ConfigError("no validation images: set val_frac > 0 or provide <data>/val/")
    ingest = build_datasets(records, classes, spec, cfg.s3_endpoint)
    for e in ingest.errors:
        print(f"[pneumo train] skipped undecodable file {e['path']} ({e['split']}): {e['error']}", file=sys.stderr)
    counts = ingest.counts
    print(f"[pneumo train] {cfg.model} {spec.channels}x{spec.size} on {cfg.num_workers} worker(s); data "
          + ", ".join(f"{s}: " + "/".join(f"{c} {n}" for c, n in counts[s].items()) for s in counts)
          + (f"; {len(ingest.errors)} undecodable file(s) left out" if ingest.errors else ""), flush=True)
    # materialised here, so the workers' shards need no CPU tasks while the workers hold every CPU
    train_ds = ingest.datasets["train"].select_columns(["image", "label"])
    if cfg.balance == "oversample":
        train_ds = oversample(train_ds, counts["train"], classes)
    train_ds = train_ds.materialize()
    val_ds = ingest.datasets["val"].select_columns(["image", "label"]).materialize()
    weights = class_weights_for(counts["train"], classes)
    result = fit(cfg, {"train": train_ds, "val": val_ds}, classes, spec, weights)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    latest = result.checkpoint
    best = result.get_best_checkpoint(metric="val_auc", mode="max") or latest
    if latest is None or best is None:
        raise RuntimeError("training produced no checkpoint")
    with latest.as_directory() as d:
        last_state = read_state(d)
    with best.as_directory() as d:
        best_state = read_state(d)
        model = get_model(cfg.model, len(classes), weights="none", input_spec=spec)
        model.load_state_dict(load_weights(d))
    history = last_state["history"]

    out = cfg.out
    bundle = os.path.join(out, "bundle") if not is_s3(out) else out.rstrip("/") + "/bundle"
    training_info = {"config": to_dict(cfg), "epochs_run": last_state["epoch"], "best_epoch": best_state["epoch"],
                     "early_stopped": bool(last_state.get("stopped")), "data_fingerprint": fingerprint(records),
                     "starts": last_state.get("starts", []),
                     "history": history, "skipped_files": ingest.errors, "counts": counts}
    save_bundle(model, bundle, cfg.model, classes, spec, training=training_info, s3_endpoint=cfg.s3_endpoint)
    # threshold on validation predictions only, through the same Predictor scoring/serving use
    splits = {s: to_numpy(ingest.datasets[s]) for s in ("val", "test") if s in ingest.datasets}
    predictor = Predictor(bundle, s3_endpoint=cfg.s3_endpoint, device="auto", precision="fp32")  # loaded once
    probs = {s: predictor.predict(d["image"]) for s, d in splits.items()}
    threshold = choose_threshold(splits["val"]["label"], probs["val"], classes, cfg.threshold_method,
                                 cfg.target_sensitivity)
    metrics = {s: epoch_metrics(splits[s]["label"], probs[s], classes, threshold["value"]) for s in splits}
    manifest = save_bundle(model, bundle, cfg.model, classes, spec, threshold=threshold, metrics=metrics,
                           training=training_info, s3_endpoint=cfg.s3_endpoint)
    reports: dict[str, Any] = {}
    if not is_s3(out):
        save_config(cfg, os.path.join(out, "config.yaml"))
        if cfg.report:
            reports = write_reports(out, splits, probs, classes, threshold, history, ingest.errors)
    summary = {"bundle": bundle, "version": manifest.version, "model": cfg.model, "threshold": threshold,
               "metrics": metrics, "epochs_run": last_state["epoch"], "best_epoch": best_state["epoch"],
               "early_stopped": bool(last_state.get("stopped")), "skipped_files": len(ingest.errors),
               "run": {"name": cfg.run_name, "storage_path": cfg.storage}, "wall_s": time.perf_counter() - t0,
               "reports": reports}
    if not is_s3(out):
        Path(out, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(summary_text(summary), flush=True)
    return summary


def write_reports(out: str, splits: dict[str, dict[str, np.ndarray]], probs: dict[str, np.ndarray],
                  classes: list[str], threshold: dict, history: list[dict],
                  skipped: list[dict] | None = None) -> dict[str, Any]:
    """The evaluation helper's JSON + Markdown + PNG report for val (and test) under `<out>/report/`."""
    from pneumo.evaluation import write_report

    errors = [{"path": e["path"], "split": e["split"], "kind": e["error"].split(":")[0],
               "reason": e["error"].partition(": ")[2]} for e in skipped or []]
    reports = {}
    for split, data in splits.items():
        reports[split] = write_report(os.path.join(out, "report", split), data["label"], probs[split], classes,
                                      threshold, split, history, {"source": "pneumo train"},
                                      errors=[e for e in errors if e["split"] == split])
    return {s: os.path.join(out, "report", s) for s in reports}


def summary_text(s: dict[str, Any]) -> str:
    lines = [f"[pneumo train] done in {s['wall_s']:.0f}s: {s['epochs_run']} epoch(s)"
             + (" (early stopped)" if s["early_stopped"] else "") + f", best epoch {s['best_epoch']}",
             f"  bundle    {s['bundle']} (version {s['version']})",
             f"  threshold {s['threshold']['value']:.4f} ({s['threshold']['method']}"
             + (f", target sensitivity {s['threshold']['target']}" if s["threshold"].get("target") else "")
             + ", chosen on val)"]
    for split, m in s["metrics"].items():
        lines.append(f"  {split:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if s["skipped_files"]:
        lines.append(f"  {s['skipped_files']} undecodable file(s) were left out (see summary.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`pneumo train DATA [--config recipe.yaml] [--flags]`."""
    cfg = parse_config(TrainConfig, argv, prog="pneumo train")
    run(cfg)
    return 0
