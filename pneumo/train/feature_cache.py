"""The frozen-feature cache (`cache_features`): the frozen backbone's pooled features computed once,
then only the classifier head trained on them (`pneumo.train.worker.make_loop` picks it).

`FeatureLoop(ts).run_epoch(train, val, number) -> (train, eval)` is `pneumo.train.engine.ImageLoop`'s
counterpart: the first epoch runs `backbone_features` over both shards (on CPU the fastest ONNX
engine through the one `Predictor`, checked against eager torch; optionally after
`reestimate_batchnorm`), showing images done, images/s and an ETA as it goes; every epoch then
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
from pneumo.bundle.manifest import ONNX_FILE, Manifest
from pneumo.bundle.predict import Predictor
from pneumo.io.preprocess import InputSpec, to_tensor
from pneumo.models.adapt import adapt_batchnorm
from pneumo.models.graph import probabilities as logits_to_probs
from pneumo.models.graph import scoring_module
from pneumo.models.onnx import ExportError, export_onnx
from pneumo.precision import autocast
from pneumo.train.augment import equalize_batch
from pneumo.train.parts import TrainState, compute_loss, unwrap

log = logging.getLogger(__name__)


FP32_TOL = (1e-3, 1e-4)  # engine features against eager torch fp32 on the first batch: allclose's rtol, atol
# bf16: the engine's error against torch fp32 (|f - f_fp32| / |f_fp32|, worst image) may be at most
# this much larger than eager torch bf16's own, which the feature cache ran before the engines did
BF16_MARGIN = 1.25


class FeatureEngine:
    """The scoring graph's `features` on the fastest ONNX engine (the one `Predictor`), checked
    against eager torch on the first batch it sees; `predictor` is None where it cannot run or the
    check failed (logged), and callers use eager torch. Built once, used for every shard."""

    def __init__(self, model: nn.Module, model_name: str | None, num_classes: int, spec: InputSpec,
                 device: torch.device, precision: str, threads: int, tta: tuple[str, ...] = ()):
        self.model, self.spec, self.tta, self.checked = model, spec, tta, False
        self.predictor = feature_predictor(model, model_name, num_classes, spec, precision, threads, tta) if (
            model_name and device.type == "cpu") else None

    def features(self, images: Any) -> torch.Tensor | None:
        if self.predictor is None:
            return None
        f = torch.from_numpy(self.predictor.predict_with_features(np.asarray(images))[1])
        if not self.checked:
            self.checked = True
            if not _features_agree(self.model, self.spec, images, f, self.predictor.precision, self.tta):
                self.predictor = None
                return None
        return f


def backbone_features(model: nn.Module, batches: Any, spec: InputSpec, device: torch.device,
                      precision: str = "fp32", channels_last: bool = True, model_name: str | None = None,
                      threads: int = 0, num_classes: int = 2, tta: tuple[str, ...] = (),
                      total: int | None = None, label: str | None = None,
                      engine: FeatureEngine | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of a frozen model over `batches`: (float32[N, F], int64[N]).

    On CPU, with `model_name` given (or an `engine` built for it), they come from the fastest ONNX
    engine at `precision` (`FeatureEngine`: the `pneumo.bundle.predict.Predictor` over the same
    scoring graph bundles carry; bf16 on OpenVINO where the CPU runs it natively), checked against
    eager torch on the first batch; on a GPU, or where the export or the check fails (logged), from
    eager torch. With a `label`, progress (images, images/s, ETA against `total`) is shown as
    `logs.Progress` does.
    """
    model.eval()
    engine = engine or FeatureEngine(model, model_name, num_classes, spec, device, precision, threads, tta)
    feats, labels = [], []
    quiet = label is None
    with logs.Progress(f"[pneumo train] {label}", total=total, write=(lambda _: None) if quiet else None,
                       bar=False if quiet else None) as progress:
        for batch in batches:
            f = engine.features(batch["image"])
            if f is None:
                x = to_tensor(batch["image"], spec, device=device, channels_last=channels_last)
                f = torch_features(model, x, precision, device, tta)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
            progress.update(len(f))
    if not feats:
        return torch.zeros((0, 0)), torch.zeros((0,), dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def feature_predictor(model: nn.Module, model_name: str, num_classes: int, spec: InputSpec, precision: str,
                      threads: int, tta: tuple[str, ...] = ()) -> Predictor | None:
    """The Predictor over the model's exported scoring graph (None, logged, where there is none)."""
    try:
        blob = export_onnx(scoring_module(model, model_name, num_classes, tta), spec)
        draft = Manifest(model=model_name, classes=[str(i) for i in range(max(2, num_classes))], input=spec,
                         onnx={"tta": list(tta)}, files={ONNX_FILE: "in-memory"})
        # bf16 is training's own precision here (native bf16 only), checked on the first batch below
        engine = "openvino" if precision == "bf16" else "auto"
        p = Predictor.from_model(model, draft, onnx_bytes=blob, engine=engine, precision=precision, threads=threads)
    except (ExportError, ImportError, ValueError, RuntimeError) as exc:
        log.warning("feature cache: no ONNX engine, eager torch instead (%s)", exc)
        return None
    if p.engine == "torch":
        return None
    log.info("feature cache: %s %s", p.engine, p.precision)
    return p


def torch_features(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device,
                    tta: tuple[str, ...] = ()) -> torch.Tensor:
    """Eager pooled features; with hflip TTA the mean of the image's and its mirror's (as the graph does)."""
    with torch.inference_mode(), autocast(device, precision):
        f = model.forward_head(model.forward_features(x), pre_logits=True).float()
        if "hflip" in tta:
            f = (f + model.forward_head(model.forward_features(torch.flip(x, dims=[3])), pre_logits=True).float()) / 2
    return f


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst image's |f - f_ref| / |f_ref|."""
    return float(((got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).max())


def _features_agree(model: nn.Module, spec: InputSpec, images: Any, got: torch.Tensor, precision: str,
                    tta: tuple[str, ...] = ()) -> bool:
    """The engine's features against eager torch fp32 on one batch; at bf16, no further from them
    than eager torch bf16 (times `BF16_MARGIN`)."""
    cpu = torch.device("cpu")
    x = to_tensor(images, spec)
    ref = torch_features(model, x, "fp32", cpu, tta)
    if precision == "bf16":
        err, torch_err = relative_error(got, ref), relative_error(torch_features(model, x, "bf16", cpu, tta), ref)
        ok = err <= BF16_MARGIN * torch_err + 1e-3
        how = f"relative {err:.2e} (eager torch bf16: {torch_err:.2e})"
    else:
        ok = bool(torch.allclose(got, ref, rtol=FP32_TOL[0], atol=FP32_TOL[1]))
        how = f"{float((got - ref).abs().max()):.2e}"
    (log.info if ok else log.warning)("feature cache: %s features vs torch fp32: %s%s", precision, how,
                                      "" if ok else "; eager torch instead")
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


def augmented_views(batches: Any, augment: Any, views: int, generator: torch.Generator, equalize: str,
                    alternate: bool = False) -> Any:
    """Each training batch, then `views` augmented copies of it (`aug_views`): the frozen backbone's
    features of augmented images are cached once, and the head learns from all of them. `equalize`
    is the model's mode when the batches were read un-equalised (acquisition augmentations). With
    `alternate` (`aug_families`), copies take turns: photometric, then field of view, and so on."""
    turns = augment.families() if alternate else (augment,)
    for batch in batches:
        images = torch.as_tensor(np.asarray(batch["image"]))
        yield {"image": equalize_batch(images, equalize), "label": batch["label"]}
        for k in range(views):
            yield {"image": turns[k % len(turns)](images, generator, equalize), "label": batch["label"]}


class FeatureLoop:
    """`cache_features`: the frozen backbone's features once (first epoch; with `aug_views`, of
    augmented copies of the training images too), then the head on them."""

    def __init__(self, ts: TrainState, sizes: dict[str, int] | None = None):
        self.ts, self.cache = ts, {}
        self.sizes = sizes or {}  # images per split (the whole split; a worker gets its share)

    def run_epoch(self, train: Any, val: Any, number: int) -> tuple[dict[str, float], dict[str, Any]]:
        ts, cfg = self.ts, self.ts.cfg
        if not self.cache:
            t0 = time.perf_counter()
            if cfg.bn_images:
                reestimate_batchnorm(ts, train.iter_torch_batches(batch_size=64), cfg.bn_images)
            tta = () if cfg.tta == "none" else (cfg.tta,)
            augment = cfg.augment()
            equalize = ts.spec.equalize if augment.raw_spec(ts.spec) != ts.spec else "none"
            engine = FeatureEngine(ts.model, cfg.model, ts.num_classes, ts.spec, ts.device, ts.precision,
                                   cfg.threads or cfg.cpus_per_worker, tta)
            for name, shard in (("train", train), ("val", val)):
                batches = shard.iter_torch_batches(batch_size=64)
                total = self.sizes[name] // ts.world if self.sizes.get(name) else None
                if name == "train" and cfg.aug_views:
                    batches = augmented_views(batches, augment, cfg.aug_views, ts.generator, equalize,
                                              cfg.aug_families == "alternate")
                    total = total * (1 + cfg.aug_views) if total else None
                self.cache[name] = backbone_features(
                    ts.model, batches, ts.spec, ts.device,
                    ts.precision, cfg.channels_last, cfg.model, cfg.threads or cfg.cpus_per_worker,
                    ts.num_classes, tta, total=total,
                    label=(f"{name} features" + (" (worker 0)" if ts.world > 1 else "")) if ts.rank == 0 else None,
                    engine=engine)
            if ts.rank == 0:
                logs.worker_line(f"[pneumo train] cached backbone features of {len(self.cache['train'][0])} train "
                                 f"and {len(self.cache['val'][0])} val images per worker in "
                                 f"{time.perf_counter() - t0:.0f}s")
        tr = train_head_epoch(ts.trainable, *self.cache["train"], ts.optimizer, ts.loss_fn, ts.num_classes,
                              cfg.batch_size, ts.generator, float(getattr(ts.model, "drop_rate", 0.0)),
                              cfg.max_steps_per_epoch)
        ev = evaluate_head(unwrap(ts.trainable), *self.cache["val"], ts.loss_fn, ts.num_classes)
        return tr, ev
