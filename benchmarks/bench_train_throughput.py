"""Throughput: the Ray Train loop vs a plain single-process torch loop, same model/batch/threads, one run.

    .venv/bin/python benchmarks/bench_train_throughput.py [--model efficientnet_lite0] [--size 128]
        [--batch 32] [--images 256] [--epochs 4] [--threads 2] [--finetune full|partial|head]
        [--n-blocks 2] [--precision fp32|bf16]

Ray side: `pneumo.train.driver.fit` (TorchTrainer, one worker with `--threads` CPUs, the dataset
shard from Ray Data, `train_one_epoch`, per-epoch val + report + rank-0 checkpoint); its
`train_images_per_s` covers the training pass (data iteration, to_tensor, forward, backward,
step), with the workers at the plain loop's niceness (0; Ray nices its workers by default). Plain side:
the same `train_one_epoch` over numpy batches in this process with `torch.set_num_threads`. The first epoch of each is warm-up; the median of the rest
is compared. Prints both and the ratio (target >= 0.95).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune", default="full", help="full, partial (the last --n-blocks) or head")
    ap.add_argument("--n-blocks", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, or auto (bf16 where native, as training)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from pneumo.config import from_dict
    from pneumo.models.factory import get_model
    from pneumo.models.finetune import set_finetune
    from pneumo.train.checkpoints import read_state
    from pneumo.train.config import TrainConfig
    from pneumo.train.driver import fit
    from pneumo.train.engine import make_optimizer, precision_for, train_one_epoch
    from pneumo.train.parts import make_loss

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size), dtype=np.uint8)
    labels = rng.integers(0, 2, args.images)
    classes = ["NORMAL", "PNEUMONIA"]
    run_dir = tempfile.mkdtemp(prefix="pneumo-bench-thr-")
    cfg = from_dict(TrainConfig, {
        "data": "unused", "out": run_dir, "name": f"thr-{int(time.time())}", "model": args.model, "weights": "none",
        "image_size": args.size, "epochs": args.epochs, "batch_size": args.batch, "patience": 0,
        "num_workers": 1, "cpus_per_worker": args.threads, "threads": args.threads, "precision": args.precision,
        "finetune": args.finetune, "n_blocks": args.n_blocks,
    })
    spec = cfg.input_spec()

    # plain single-process loop --------------------------------------------------------------
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = get_model(cfg.model, 2, weights="none", input_spec=spec).to(memory_format=torch.channels_last)
    set_finetune(model, cfg.model, cfg.finetune, cfg.n_blocks)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    loss_fn = make_loss(2)
    plain = []
    for epoch in range(args.epochs):
        order = np.random.default_rng(epoch).permutation(args.images)
        batches = ({"image": torch.from_numpy(images[order[i:i + args.batch]]),
                    "label": torch.from_numpy(labels[order[i:i + args.batch]])}
                   for i in range(0, args.images, args.batch))
        model.train()
        r = train_one_epoch(model, batches, optimizer, loss_fn, spec, 2, device, precision_for(args.precision, device))
        plain.append(r["images"] / r["seconds"])
        print(f"plain epoch {epoch + 1}: {plain[-1]:.1f} img/s", flush=True)

    # Ray Train loop ---------------------------------------------------------------------------
    # Ray starts its workers niced (RAY_worker_niceness); the plain loop runs at 0, so on
    # a machine other jobs are loading the comparison would measure the scheduler, not Ray.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, ignore_reinit_error=True)
    items = [{"image": images[i], "label": int(labels[i])} for i in range(args.images)]
    train_ds = ray.data.from_items(items).materialize()
    val_ds = ray.data.from_items(items[: args.batch]).materialize()
    result = fit(cfg, {"train": train_ds, "val": val_ds}, classes, spec, [1.0, 1.0])
    with result.checkpoint.as_directory() as d:
        history = read_state(d)["history"]
    ray_ips = [h["train_images_per_s"] for h in history]
    for h in history:
        print(f"ray   epoch {h['epoch']}: {h['train_images_per_s']:.1f} img/s", flush=True)

    p, r = statistics.median(plain[1:] or plain), statistics.median(ray_ips[1:] or ray_ips)
    print(f"\n{args.model} {args.size}px batch {args.batch}, finetune {args.finetune}"
          f"{f' (last {args.n_blocks} blocks)' if args.finetune == 'partial' else ''}, {args.precision}, "
          f"{args.threads} threads, {args.images} images/epoch, "
          f"median of epochs 2..{args.epochs}")
    print(f"plain torch loop : {p:8.1f} img/s")
    print(f"Ray Train loop   : {r:8.1f} img/s")
    print(f"ratio ray/plain  : {r / p:8.3f}  (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
