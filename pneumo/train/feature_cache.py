"""The frozen-feature cache (`cache_features`): the frozen backbone's pooled features computed once,
then only the classifier head trained on them (`pneumo.train.worker.make_loop` picks it).

`FeatureLoop(ts).run_epoch(train, val, number) -> (train, eval)` is `pneumo.train.engine.ImageLoop`'s
counterpart: the first epoch runs `backbone_features` over both shards (ONNX Runtime on CPU,
checked against eager torch; optionally after `reestimate_batchnorm`), every epoch then
`train_head_epoch` and `evaluate_head` on the cached tensors.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumo import logs
from pneumo.io.preprocess import InputSpec, equalize_array, to_tensor
from pneumo.models.adapt import adapt_batchnorm
from pneumo.models.graph import probabilities as logits_to_probs
from pneumo.models.graph import scoring_module
from pneumo.models.onnx import ExportError, export_onnx, ort_session, run_session
from pneumo.precision import autocast
from pneumo.train.parts import TrainState, compute_loss, unwrap

log = logging.getLogger(__name__)


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
    try:
        graph = scoring_module(model, model_name, num_classes, tta)
        return ort_session(export_onnx(graph, spec), threads)
    except (ExportError, ImportError, ValueError) as exc:
        log.warning("feature cache: ONNX Runtime unavailable, eager torch instead (%s)", exc)
        return None


def _torch_features(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device,
                    tta: tuple[str, ...] = ()) -> torch.Tensor:
    """Eager pooled features; with hflip TTA the mean of the image's and its mirror's (as the graph does)."""
    with torch.inference_mode(), autocast(device, precision):
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


def augmented_views(batches: Any, augment: Any, views: int, generator: torch.Generator, equalize: str) -> Any:
    """Each training batch, then `views` augmented copies of it (`aug_views`): the frozen backbone's
    features of augmented images are cached once, and the head learns from all of them. `equalize`
    is the model's mode when the batches were read un-equalised (acquisition augmentations)."""
    for batch in batches:
        images = torch.as_tensor(np.asarray(batch["image"]))
        plain = images if equalize == "none" else torch.stack(
            [torch.from_numpy(equalize_array(x.numpy(), equalize)) for x in images])
        yield {"image": plain, "label": batch["label"]}
        for _ in range(views):
            yield {"image": augment(images, generator, equalize), "label": batch["label"]}


class FeatureLoop:
    """`cache_features`: the frozen backbone's features once (first epoch; with `aug_views`, of
    augmented copies of the training images too), then the head on them."""

    def __init__(self, ts: TrainState):
        self.ts, self.cache = ts, {}

    def run_epoch(self, train: Any, val: Any, number: int) -> tuple[dict[str, float], dict[str, Any]]:
        ts, cfg = self.ts, self.ts.cfg
        if not self.cache:
            t0 = time.perf_counter()
            if cfg.bn_images:
                reestimate_batchnorm(ts, train.iter_torch_batches(batch_size=64), cfg.bn_images)
            tta = () if cfg.tta == "none" else (cfg.tta,)
            augment = cfg.augment()
            equalize = ts.spec.equalize if augment.raw_spec(ts.spec) != ts.spec else "none"
            for name, shard in (("train", train), ("val", val)):
                batches = shard.iter_torch_batches(batch_size=64)
                if name == "train" and cfg.aug_views:
                    batches = augmented_views(batches, augment, cfg.aug_views, ts.generator, equalize)
                self.cache[name] = backbone_features(ts.model, batches, ts.spec, ts.device, ts.precision,
                                                     cfg.channels_last, cfg.model, cfg.threads or cfg.cpus_per_worker,
                                                     ts.num_classes, tta)
            if ts.rank == 0:
                logs.worker_line(f"[pneumo train] cached backbone features of {len(self.cache['train'][0])} train "
                                 f"and {len(self.cache['val'][0])} val images per worker in "
                                 f"{time.perf_counter() - t0:.0f}s")
        tr = train_head_epoch(ts.trainable, *self.cache["train"], ts.optimizer, ts.loss_fn, ts.num_classes,
                              cfg.batch_size, ts.generator, float(getattr(ts.model, "drop_rate", 0.0)),
                              cfg.max_steps_per_epoch)
        ev = evaluate_head(unwrap(ts.trainable), *self.cache["val"], ts.loss_fn, ts.num_classes)
        return tr, ev
