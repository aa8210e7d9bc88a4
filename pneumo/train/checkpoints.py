"""Training checkpoints: one `epoch_NNNN` folder per epoch with the weights (safetensors), the
counters/history (`state.json`) and the optimizer/scheduler state (`optim.pt`, torch.save of our
own dicts, read back with `weights_only=True`).

`latest_checkpoint` picks where a (re)started worker group resumes: the newer of Ray's
registered checkpoint and the newest `epoch_NNNN` folder whose three files all load, so a torn
checkpoint (a worker or node that died while writing it) is skipped for the previous one.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pneumo.bundle.store import weights_bytes
from pneumo.io.storage import Location

WEIGHTS_FILE = "model.safetensors"
TRAIN_WEIGHTS_FILE = "train.safetensors"  # with EMA: the live weights (model.safetensors holds the average)
STATE_FILE = "state.json"
OPTIM_FILE = "optim.pt"


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any], ema: Any = None) -> None:
    """Weights as safetensors, counters/history as JSON, optimizer/scheduler state via torch.save
    (our own files only; read back with `weights_only=True`). With `ema` (an AveragedModel), the
    averaged weights are the checkpoint's model (what was evaluated and is exported) and the live
    ones go beside them, for resuming."""
    Path(directory, WEIGHTS_FILE).write_bytes(weights_bytes(ema.module if ema is not None else model))
    if ema is not None:
        Path(directory, TRAIN_WEIGHTS_FILE).write_bytes(weights_bytes(model))
    Path(directory, STATE_FILE).write_text(json.dumps(state, indent=1))
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None},
               os.path.join(directory, OPTIM_FILE))


def read_state(directory: str) -> dict[str, Any]:
    return json.loads(Path(directory, STATE_FILE).read_text())


def load_weights(directory: str, name: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, name))


def restore_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> dict[str, Any]:
    """Load the live weights, optimizer and scheduler state from `directory`; returns its `state.json`."""
    averaged = os.path.exists(os.path.join(directory, TRAIN_WEIGHTS_FILE))
    model.load_state_dict(load_weights(directory, TRAIN_WEIGHTS_FILE if averaged else WEIGHTS_FILE))
    state = read_state(directory)
    opt = torch.load(os.path.join(directory, OPTIM_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    if scheduler is not None and opt.get("scheduler"):
        scheduler.load_state_dict(opt["scheduler"])
    return state


def restore_average(directory: str, ema: Any) -> None:
    """The moving average saved with the checkpoint in `directory` (kept from the live weights when
    the run had none)."""
    if os.path.exists(os.path.join(directory, TRAIN_WEIGHTS_FILE)):
        ema.module.load_state_dict(load_weights(directory))


def complete_epoch(fs: Any, path: str) -> int:
    """The epoch of the checkpoint at `path` on `fs` if all three files are there and load, else -1."""
    from safetensors.torch import load as load_safetensors

    def read(name: str) -> bytes:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read()

    try:
        epoch = int(json.loads(read(STATE_FILE))["epoch"])
        load_safetensors(read(WEIGHTS_FILE))
        torch.load(io.BytesIO(read(OPTIM_FILE)), map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated or corrupt: not a checkpoint to resume from
        return -1
    return epoch


def latest_checkpoint(given: Any, storage: Location | str | None, run_name: str) -> Any:
    """The newer of Ray's `get_checkpoint()` and the newest complete `epoch_NNNN` folder this run wrote.

    Ray Train restores the latest *registered* checkpoint; when a worker dies right after a report,
    the controller can see the failure before it registers that report's checkpoint, and the group
    would silently repeat an epoch. Our own checkpoints are named by epoch, so the run folder tells
    us the truth. A folder whose files do not all load (torn write) is skipped for the one before.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    checked: dict[str, int] = {}
    best, best_epoch = None, -1
    if given is not None:
        checked[given.path] = best_epoch = complete_epoch(given.filesystem, given.path)
        best = given if best_epoch >= 0 else None
    if not storage:
        return best
    storage = Location.of(storage)
    fs, run_dir = storage.fs, storage.join(run_name).path
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError:
        return best
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("epoch_")), reverse=True)
    for name in names:
        path = f"{run_dir}/{name}"
        epoch = checked[path] if path in checked else complete_epoch(fs, path)
        if epoch < 0:
            print(f"[pneumo train] skipping incomplete checkpoint {path}", file=sys.stderr, flush=True)
            continue
        if epoch > best_epoch:
            best, best_epoch = Checkpoint(path=path, filesystem=fs), epoch
        break
    return best
