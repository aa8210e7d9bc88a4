"""Batch-scoring throughput: `pneumo score` (Ray Data) vs a plain DataLoader loop vs the bare forward pass.

    .venv/bin/python benchmarks/bench_score.py                 # 3000 images (2/3 224 px, 1/3 full-res)
    .venv/bin/python benchmarks/bench_score.py --n 600 --actors 1   # quicker

Workload: the real 224 px set (`../shared/data/chest_xray_224`) plus the full-resolution
originals (`chest_xray_fullres_sample`, 48 files) repeated (symlinks) up to `--fullres-frac` of
`--n`. Model: efficientnet_lite0 with its pretrained backbone, saved as a pneumo bundle. All in
ONE run, same model, same machine (Ray is started with `num_cpus` = the machine's cores):

- (a) plain: `torch.utils.data.DataLoader(num_workers=2)` decoding with PIL (convert RGB, resize,
  normalise), model in fp32, NCHW, default torch threads;
- (b) forward only: ONNX Runtime (pneumo's engine on CPU) on preloaded tensors, with the same
  threads as pneumo's actor, plus eager torch fp32 (NCHW, channels_last) and bf16 for reference;
- pneumo: `pneumo.score.driver.run_score` end to end (listing, read, decode, model, files, Delta commit)
  with its default pool sizing (`--actors auto`) and fixed pools.

Prints images/s of each, ratios pneumo/(a) and pneumo/(b), and writes `--json`.
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

from pneumo.bundle.predict import Predictor  # noqa: E402
from pneumo.bundle.store import save_bundle  # noqa: E402
from pneumo.config import parse_config  # noqa: E402
from pneumo.io.preprocess import load_image, to_tensor  # noqa: E402
from pneumo.models.factory import get_model  # noqa: E402
from pneumo.models.zoo import get_spec  # noqa: E402
from pneumo.precision import autocast, bf16_native  # noqa: E402

MODEL = "efficientnet_lite0"


def shared_root() -> Path:
    return Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data")


def build_workload(root: Path, work: Path, n: int, fullres_frac: float) -> list[Path]:
    """Symlinks under `work/data`: n*(1-frac) 224 px images and the originals repeated to n*frac."""
    small = sorted((root / "chest_xray_224").rglob("*.jpeg"))
    full = sorted(p for p in (root / "chest_xray_fullres_sample").rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not small or not full:
        sys.exit(f"real data not found under {root} (set PNEUMO_SHARED_DATA)")
    n_full = int(round(n * fullres_frac))
    n_small = min(n - n_full, len(small))
    data = work / "data"
    out: list[Path] = []
    for p in small[:n_small]:
        dst = data / "224" / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(p)
        out.append(dst)
    for i in range(n_full):
        p = full[i % len(full)]
        dst = data / "fullres" / f"rep{i // len(full):03d}" / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(p)
        out.append(dst)
    return out


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


def bench_plain(model: torch.nn.Module, paths: list[Path], batch_size: int) -> float:
    spec = get_spec(MODEL).input
    loader = torch.utils.data.DataLoader(PlainDataset(paths, spec.size, spec.mean, spec.std),
                                         batch_size=batch_size, num_workers=2)
    model = model.to(memory_format=torch.contiguous_format).eval()
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for x in loader:
            torch.sigmoid(model(x))
            n += len(x)
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- (b) forward only


def bench_forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int, precision: str, channels_last: bool,
                  min_seconds: float = 8.0) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).eval()
    x = x.contiguous(memory_format=fmt)
    dev = torch.device("cpu")
    with torch.inference_mode(), autocast(dev, precision):
        model(x[:batch_size])  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds or n < len(x):
            for s in range(0, len(x), batch_size):
                model(x[s : s + batch_size])
                n += len(x[s : s + batch_size])
            if time.perf_counter() - t0 > 3 * min_seconds:
                break
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- pneumo


def bench_ort(bundle: Path, x: torch.Tensor, batch_size: int, threads: int, min_seconds: float = 8.0) -> float:
    """ONNX Runtime alone on preloaded float tensors: the ceiling for pneumo's model actor."""
    from pneumo.models.onnx import run_session

    session = Predictor(str(bundle), threads=threads)._session
    arr = x.numpy()
    run_session(session, arr[:batch_size])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds or n < len(arr):
        for s in range(0, len(arr), batch_size):
            run_session(session, arr[s : s + batch_size])
            n += len(arr[s : s + batch_size])
    return n / (time.perf_counter() - t0)


def bench_pneumo(data: Path, bundle: Path, out: Path, actors: str, batch_size: int, cores: int) -> dict:
    from pneumo.score.config import ScoreConfig
    from pneumo.score.driver import run_score
    from pneumo.score.tasks import size_pool

    argv = [str(data), "--bundle", str(bundle), "--out", str(out), "--batch-size", str(batch_size)]
    if actors != "auto":
        k = int(actors)
        argv += ["--min-actors", str(k), "--max-actors", str(k), "--cpus-per-actor",
                 str(max(0.25, (cores - 0.25) / k)), "--threads", str(max(1, cores // k))]
    cfg = parse_config(ScoreConfig, argv)
    pool = size_pool(cfg)
    r = run_score(cfg)
    return {"actors": actors, "pool": pool.__dict__, "images": r.n_scored, "ok": r.counts["ok"],
            "errors": r.counts["error"], "wall_s": r.wall_s, "images_per_s": r.images_per_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="images to score")
    ap.add_argument("--fullres-frac", type=float, default=1 / 3, help="share of full-resolution originals")
    ap.add_argument("--batch-size", type=int, default=64, help="pneumo's default, also used by (b)")
    ap.add_argument("--actors", default="auto,2", help="actor pools to measure: auto (the default sizing) or N")
    ap.add_argument("--forward-n", type=int, default=256, help="preloaded images for (b)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 forward reference")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                                 "bf16_native": bf16_native(torch.device("cpu")), "torch": torch.__version__},
                     "n": args.n, "batch_size": args.batch_size}
    try:
        paths = build_workload(shared_root(), work, args.n, args.fullres_frac)
        results["n"] = len(paths)
        torch.manual_seed(0)
        model = get_model(MODEL, 2, weights="pretrained")
        spec = get_spec(MODEL).input
        save_bundle(model, str(work / "bundle"), MODEL, ["NORMAL", "PNEUMONIA"], spec)
        results["pneumo_engine"] = "onnxruntime fp32"
        print(f"workload: {len(paths)} images in {work / 'data'}; pneumo engine: onnxruntime fp32", flush=True)

        # (b) forward only, on preloaded tensors (a mix of 224 and full-res inputs).
        step = max(1, len(paths) // args.forward_n)
        imgs = np.stack([load_image(p.read_bytes(), str(p), spec) for p in paths[::step][: args.forward_n]])
        x = to_tensor(imgs, spec)
        torch.set_num_threads(cores)
        fwd = {
            "onnxruntime_fp32": bench_ort(work / "bundle", x, args.batch_size, cores),
            "torch_fp32_channels_last": bench_forward(model, x, args.batch_size, "fp32", True),
            "torch_fp32_nchw": bench_forward(model, x, args.batch_size, "fp32", False),
        }
        if not args.no_bf16:
            fwd["torch_bf16_channels_last"] = bench_forward(model, x[:64], args.batch_size, "bf16", True,
                                                            min_seconds=5)
        results["forward_only"] = fwd
        b_key = "onnxruntime_fp32"
        print("(b) forward only, images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in fwd.items()), flush=True)

        # (a) plain DataLoader loop.
        results["plain_dataloader"] = bench_plain(model, paths, args.batch_size)
        print(f"(a) plain DataLoader(num_workers=2) + fp32 NCHW loop: {results['plain_dataloader']:.1f} images/s",
              flush=True)

        # pneumo, end to end.
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        from pneumo.score.config import ScoreConfig
        from pneumo.score.driver import run_score

        warm = work / "warm"
        warm.mkdir()
        for p in paths[:16]:
            (warm / p.name).symlink_to(p.resolve())
        run_score(parse_config(ScoreConfig, [str(warm), "--bundle", str(work / "bundle"), "--out", str(work / "warm_out")]))
        results["pneumo"] = []
        for k in [a for a in args.actors.split(",") if a]:
            r = bench_pneumo(work / "data", work / "bundle", work / f"out_a{k}", k, args.batch_size, cores)
            results["pneumo"].append(r)
            print(f"pneumo score, actors {k} (pool {r['pool']}): "
                  f"{r['images_per_s']:.1f} images/s ({r['images']} images, {r['wall_s']:.1f} s, {r['errors']} errors)",
                  flush=True)
        ray.shutdown()

        best = max(results["pneumo"], key=lambda r: r["images_per_s"])
        results["ratio_vs_plain"] = best["images_per_s"] / results["plain_dataloader"]
        results["ratio_vs_forward"] = best["images_per_s"] / fwd[b_key]
        print("\nsummary (images/s):")
        print(f"  (a) plain DataLoader loop, fp32 NCHW : {results['plain_dataloader']:8.1f}")
        print(f"  (b) forward only, {b_key:<20}: {fwd[b_key]:8.1f}")
        for r in results["pneumo"]:
            print(f"  pneumo score, actors {r['actors']:<4}               : {r['images_per_s']:8.1f}")
        print(f"  pneumo (best) / (a) = {results['ratio_vs_plain']:.2f}x  (target >= 4x)")
        print(f"  pneumo (best) / (b) = {results['ratio_vs_forward']:.2f}x  (target >= 0.8x)")
        if "torch_bf16_channels_last" in fwd:
            print(f"  torch bf16 / fp32 forward (channels_last) = "
                  f"{fwd['torch_bf16_channels_last'] / fwd['torch_fp32_channels_last']:.2f}x"
                  f" (bf16_native={results['machine']['bf16_native']})")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
