"""One Ray Train worker of `pneumo train`: `train_func` (what `pneumo.train.driver.fit` hands the
TorchTrainer) builds the worker's state with `setup_training` (also called by tests without
Ray), resumes from the latest checkpoint, and runs `pneumo.train.engine.run_epoch` per epoch,
reporting metrics and a checkpoint to Ray Train each time.

`PNEUMO_TEST_FAIL_AT_EPOCH=N:MARKER` (`FAULT_ENV`, tests only) makes the last worker exit once
at epoch N, to exercise Ray Train's restart from checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumo import logs
from pneumo.config import from_dict
from pneumo.io.preprocess import InputSpec
from pneumo.models.factory import get_model
from pneumo.models.finetune import set_finetune
from pneumo.train.checkpoints import (
    latest_checkpoint,
    restore_average,
    restore_checkpoint,
    save_checkpoint,
)
from pneumo.train.config import TrainConfig
from pneumo.train.engine import ImageLoop, Loop, progress_line, run_epoch
from pneumo.train.feature_cache import FeatureLoop
from pneumo.train.parts import (
    TrainState,
    make_ema,
    make_loss,
    make_optimizer,
    make_scheduler,
    precision_for,
)
from pneumo.train.tracked import epoch_tracker, log_epoch

FAULT_ENV = "PNEUMO_TEST_FAIL_AT_EPOCH"


def make_loop(ts: TrainState, sizes: dict[str, int] | None = None) -> Loop:
    """The frozen-feature loop with `cache_features` (`sizes`: images per split, for its progress), else the image loop."""
    return FeatureLoop(ts, sizes) if ts.cfg.cache_features else ImageLoop(ts)


def setup_training(cfg: TrainConfig, classes: list[str], spec: InputSpec, class_weights: list[float] | None = None,
                   device: torch.device | None = None, rank: int = 0, world: int = 1,
                   wrap: Callable[[nn.Module], nn.Module] | None = None, resume: str | None = None) -> TrainState:
    """One worker's model, optimizer, schedule, loss and counters, restored from the checkpoint
    folder `resume` when given, on `device` and wrapped by `wrap` (Ray's `prepare_model`; identity
    by default, so tests can call this without Ray)."""
    device = device or torch.device("cpu")
    torch.set_num_threads(max(1, cfg.threads or cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed + rank)
    precision = precision_for(cfg.precision, device)
    model = get_model(cfg.model, len(classes), weights=cfg.weights, input_spec=spec, **cfg.model_options())
    set_finetune(model, cfg.model, cfg.finetune, cfg.n_blocks)  # the optimizer gets the final stage's set
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(cfg, optimizer)
    loss_fn = make_loss(len(classes), class_weights if cfg.balance == "weighted_loss" else None,
                        cfg.label_smoothing).to(device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_loss": math.inf, "bad_epochs": 0,
                             "best_auc": -1.0, "best_epoch": 0, "stopped": False}
    if resume is not None:
        state = restore_checkpoint(resume, model, optimizer, scheduler)
    state.setdefault("starts", []).append(state["epoch"])  # where each attempt began (resume/failure audit)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(model, cfg.ema)
    if ema is not None and resume is not None:
        restore_average(resume, ema)
    ts = TrainState(cfg, list(classes), spec, model, optimizer, scheduler, loss_fn, scaler, device, precision,
                    state, rank, world, wrap or (lambda m: m),
                    generator=torch.Generator().manual_seed(cfg.seed * 1000 + rank), ema=ema)
    ts.set_stage(ts.stage_for(state["epoch"]))
    return ts


def _test_fault(rank: int, world: int, number: int) -> None:
    """`PNEUMO_TEST_FAIL_AT_EPOCH=N:MARKER` (tests only): the last worker exits at epoch N, once."""
    at, _, marker = os.environ.get(FAULT_ENV, "").partition(":")
    if at and int(at) == number and rank == world - 1 and marker and not os.path.exists(marker):
        Path(marker).write_text(f"worker {rank} exited at epoch {number}\n")
        logs.worker_line(f"[pneumo train] test failure injection: rank {rank} exits at epoch {number}")
        os._exit(1)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop: `config` = {"cfg": TrainConfig as dict, "classes", "spec", "class_weights"}."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    checkpoint = latest_checkpoint(ray.train.get_checkpoint(), cfg.storage_location, cfg.run_name)
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume:
        ts = setup_training(cfg, list(config["classes"]), InputSpec.from_dict(config["spec"]),
                            config.get("class_weights"), ray.train.torch.get_device(), rank, world,
                            ray.train.torch.prepare_model, resume)
    if checkpoint is not None and rank == 0:
        logs.worker_line(f"[pneumo train] resuming after epoch {ts.state['epoch']} from {checkpoint.path}")
    loop = make_loop(ts, config.get("sizes"))
    tracker = epoch_tracker(config.get("tracking") if rank == 0 else None)  # MLflow from rank 0 only
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(ts.state["epoch"], cfg.epochs):
        if ts.state.get("stopped"):
            break
        _test_fault(rank, world, epoch + 1)
        metrics = run_epoch(ts, loop, train_shard, val_shard, epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, ts.model, ts.optimizer, ts.scheduler, ts.state, ts.ema)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        if rank == 0:
            logs.worker_line(progress_line(metrics, cfg.epochs))
            log_epoch(tracker, metrics)
        if metrics["early_stopped"]:
            if rank == 0:
                logs.worker_line(f"[pneumo train] early stopping: val loss has not improved for {cfg.patience} epochs")
            break
    tracker.flush()
