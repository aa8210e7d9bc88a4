"""Tracking overhead per training epoch: what rank 0's loop waits for when it logs an epoch
(`pneumo.train.tracked.log_epoch`: MLflow's asynchronous logging, the real `Tracker`), next to the
plain synchronous `log_batch` a training loop would otherwise make, against a local SQLite store,
relative to the default recipe's epoch time read from a real run's bundle (median
`train_seconds` of its history: the train part only, so the ratio is an upper bound).

    .venv/bin/python benchmarks/bench_tracking.py --bundle runs/default/bundle [--epochs 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a bundle trained with the default recipe (its history)")
    p.add_argument("--epochs", type=int, default=50)
    args = p.parse_args()
    from pneumo.bundle.manifest import read_manifest
    from pneumo.track.tracking import Tracker, prepare
    from pneumo.train.tracked import log_epoch

    manifest = read_manifest(args.bundle)
    history = manifest.training["history"]
    epoch_s = statistics.median(r["train_seconds"] for r in history)
    with tempfile.TemporaryDirectory(prefix="bench-track-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        experiment = prepare(uri, "bench")
        waits: dict[str, list[float]] = {"pneumo (async)": [], "synchronous log_batch": []}
        for name in list(waits):
            run = Tracker.start(uri, experiment, name, name, {})
            run.log_metrics({"warmup": 1.0})  # the client and the connection, once per run
            for i in range(args.epochs):
                row = {**history[i % len(history)], "epoch": i + 1}
                t0 = time.perf_counter()
                if name.startswith("pneumo"):
                    log_epoch(run, row)
                else:
                    run.log_metrics({k: v for k, v in row.items() if k != "stage"}, step=i + 1)
                waits[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run.flush()
            flush_s = time.perf_counter() - t0
            run.finish()
            waits[name + " flush_s"] = [flush_s]
    out = {"model": manifest.model, "epoch_train_s_median": round(epoch_s, 4), "epochs": args.epochs,
           "load": os.getloadavg()}
    for name in ("pneumo (async)", "synchronous log_batch"):
        med = statistics.median(waits[name])
        out[name] = {"median_ms": round(1000 * med, 3), "p95_ms": round(1000 * sorted(waits[name])[int(0.95 * args.epochs)], 3),
                     "share_of_epoch": round(med / epoch_s, 5)}
    out["flush_at_end_s"] = round(waits["pneumo (async) flush_s"][0], 4)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
