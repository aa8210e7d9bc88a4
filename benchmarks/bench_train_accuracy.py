"""Accuracy benchmark: train recipes on the real data and report test metrics with 95% CIs.

    .venv/bin/python benchmarks/bench_train_accuracy.py [--data ../shared/data/chest_xray_224]
        [--out /tmp/pneumo-bench-acc] [--recipes efficientnet_lite0,seed_cnn] [--seed-cnn-epochs 8]

Val and test are carved out of the published train split by patient (10% + 10%, seed 0); the
threshold is chosen on val only (each recipe's method) and applied unchanged to test. Prints, per
recipe, a val row (what recipes are chosen on, with the worst acquisition group) and a carved-test
row (AUC, sensitivity, specificity, accuracy with bootstrap 95% CIs, epochs and wall time), and
writes `<out>/results.json`. The published test split is never read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("PNEUMO_SHARED_DATA", str(REPO.parent / "shared" / "data"))
                    + "/chest_xray_224")
    ap.add_argument("--out", default="/tmp/pneumo-bench-acc")
    ap.add_argument("--recipes", default="efficientnet_lite0,seed_cnn")
    ap.add_argument("--seed-cnn-epochs", type=int, default=8, help="shorter budget for seed_cnn (CPU time)")
    ap.add_argument("--extra", default="", help="extra flags for every recipe, e.g. '--equalize hist'")
    ap.add_argument("--tag", default="", help="suffix for run folders (variants)")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"skipped: real data not found at {args.data}")
        return 0
    import ray

    from pneumo.config import parse_config
    from pneumo.train.config import TrainConfig
    from pneumo.train.driver import run

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, ignore_reinit_error=True)
    rows, results = [], {}
    for recipe in [r for r in args.recipes.split(",") if r]:
        out = os.path.join(args.out, recipe + (f"-{args.tag}" if args.tag else ""))
        argv_r = [args.data, "--config", str(REPO / "ray_jobs" / "recipes" / f"{recipe}.yaml"), "--out", out,
                  "--name", f"bench-{recipe}-{args.tag or 'base'}-{int(time.time())}"]
        if recipe == "seed_cnn":
            argv_r += ["--epochs", str(args.seed_cnn_epochs)]
        argv_r += args.extra.split()
        cfg = parse_config(TrainConfig, argv_r, prog="bench")
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
        reps = {split: json.loads(Path(out, "report", split, "report.json").read_text()) for split in ("val", "test")}
        for split, rep in reps.items():
            m, ci = rep["metrics"], rep["ci"]

            def cell(k: str, m=m, ci=ci) -> str:
                lo, hi = ci[k] if isinstance(ci[k], (list, tuple)) else (ci[k]["low"], ci[k]["high"])
                return f"{m[k]:.3f} ({lo:.3f}-{hi:.3f})"

            worst = (rep.get("groups") or {}).get("worst", {})
            worst_text = ", ".join(f"{k} {v['value']:.3f} ({v['group']})" for k, v in worst.items()) or "n/a"
            row = (f"| {recipe}{' ' + args.extra if args.extra else ''} | {split} | {rep['n']} | {cell('auc')} | "
                   f"{cell('sensitivity')} | {cell('specificity')} | {cell('accuracy')} | {worst_text} | "
                   f"{summary['threshold']['value']:.3f} ({summary['threshold']['method']}) | "
                   f"{summary['epochs_run']} | {wall / 60:.1f} min |")
            rows.append(row)
            print(row, flush=True)
        results[recipe] = {"summary": summary, "wall_s": wall,
                           **{s: {"metrics": r["metrics"], "ci": r["ci"], "n": r["n"], "groups": r.get("groups")}
                              for s, r in reps.items()}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"results{'-' + args.tag if args.tag else ''}.json").write_text(
        json.dumps(results, indent=2, default=str))
    print("| recipe | split | n | AUC (95% CI) | sensitivity | specificity | accuracy | worst group | "
          "threshold (val) | epochs | wall |")
    print("| --- | --- | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
