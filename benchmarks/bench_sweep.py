"""A sweep's overhead: N trials of the seed CNN on synthetic data as one `pneumo sweep` (Ray Tune,
max_concurrent_trials auto) vs the same N `pneumo train` runs one after another (each its own
process and local Ray, as a user would type them). Same options, same data; both untracked, so
only the orchestration differs. Prints both walls and the ratio (target: the sweep is not slower).

    .venv/bin/python benchmarks/bench_sweep.py [--trials 8] [--n 160] [--epochs 3] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PNEUMO = str(Path(sys.executable).with_name("pneumo"))


def options(args: argparse.Namespace) -> dict:
    return {"model": "seed_cnn", "weights": "none", "image_size": args.image_size, "epochs": args.epochs,
            "patience": 0, "num_workers": 1, "batch_size": 16, "val_frac": 0.2, "test_frac": 0.2,
            "optimizer": "adam", "threshold_method": "youden"}


def lrs(n: int) -> list[float]:
    return [round(1e-3 * (1 + i), 6) for i in range(n)]


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    if rc:
        sys.exit(f"{' '.join(cmd[:2])} failed (exit {rc}); its log:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--n", type=int, default=160, help="synthetic images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--json", default="")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        subprocess.run([PNEUMO, "synth", str(root / "data"), "--n", str(args.n), "--min-size", "256",
                        "--max-size", "384"], check=True, capture_output=True)
        import yaml

        (root / "sweep.yaml").write_text(yaml.safe_dump({"base": options(args), "search": {"lr": {"grid": lrs(args.trials)}},
                                                          "metric": "val_auc"}))
        sweep_s = run([PNEUMO, "sweep", str(root / "data"), "--config", str(root / "sweep.yaml"),
                       "--out", str(root / "sweep"), "--no-tracking"], root / "sweep.log")
        table = json.loads((root / "sweep" / "sweep.json").read_text())
        seq_s = 0.0
        for i, lr in enumerate(lrs(args.trials)):
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in options(args).items()]
            seq_s += run([PNEUMO, "train", str(root / "data"), "--out", str(root / f"seq{i}"), *flags, f"--lr={lr}",
                          "--no-tracking"], root / "seq.log")
        out = {"trials": args.trials, "ok": table["counts"]["ok"], "sweep_s": round(sweep_s, 1),
               "sequential_s": round(seq_s, 1), "sweep_over_sequential": round(sweep_s / seq_s, 3),
               "cpus": os.cpu_count(), "load": os.getloadavg()}
        print(json.dumps(out, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
