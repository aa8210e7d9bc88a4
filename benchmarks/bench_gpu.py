"""The torch CUDA path on a GPU machine (no Ray there): AMP training step, channels_last, batch Predictor.

    python benchmarks/bench_gpu.py [--model efficientnet_lite0] [--steps 30] [--json OUT.json]

Baseline and pneumo in one run, on the same GPU:
- training step (forward + backward + Adam), full fine-tune, batch 64: plain fp32 NCHW (baseline)
  vs pneumo's `train_one_epoch` with bf16 autocast + channels_last (precision=auto on CUDA);
- batch prediction, batch 256, uint8 images on the host -> probabilities on the host: plain fp32
  NCHW eager loop (baseline) vs `Predictor(engine=auto)` (torch on CUDA, bf16 where native,
  channels_last), which is what batch-scoring actors with --gpus-per-actor run.
Random-init weights (the pretrained packages are not on the GPU machine); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumo import precision as P  # noqa: E402
from pneumo.bundle.predict import Predictor  # noqa: E402
from pneumo.bundle.store import save_bundle  # noqa: E402
from pneumo.io.preprocess import to_tensor  # noqa: E402
from pneumo.models.factory import get_model  # noqa: E402
from pneumo.models.zoo import get_spec  # noqa: E402
from pneumo.train.engine import train_one_epoch  # noqa: E402
from pneumo.train.parts import make_loss  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batches(n: int, batch: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, generator=g),
             "label": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def train_rate(name: str, device: torch.device, steps: int, batch: int, amp: bool) -> float:
    spec = get_spec(name).input
    model = get_model(name, 2).to(device)
    channels_last = amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = make_loss(2).to(device)
    precision = P.resolve("auto", device, training=True) if amp else "fp32"
    data = batches(steps + 3, batch, spec.size)
    model.train()
    train_one_epoch(model, data[:3], opt, loss_fn, spec, 2, device, precision, channels_last=channels_last)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    r = train_one_epoch(model, data[3:], opt, loss_fn, spec, 2, device, precision, channels_last=channels_last)
    sync(device)
    return r["images"] / (time.perf_counter() - t0)


def predict_rates(name: str, device: torch.device, n_batches: int, batch: int) -> dict[str, float]:
    spec = get_spec(name).input
    model = get_model(name, 2).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(model, tmp, name, ["NORMAL", "PNEUMONIA"], spec, onnx=False)
        predictor = Predictor(tmp, device=str(device))
        images = [np.random.default_rng(i).integers(0, 256, (batch, spec.size, spec.size), dtype=np.uint8)
                  for i in range(n_batches)]
        plain = model.to(device)

        def baseline(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.sigmoid(plain(to_tensor(x, spec, device=device)).float()).cpu().numpy()

        out = {"engine": predictor.engine, "precision": predictor.precision}
        for label, fn in (("plain_fp32_nchw", baseline), ("pneumo_predictor", predictor.predict)):
            fn(images[0])
            sync(device)
            t0 = time.perf_counter()
            for x in images:
                fn(x)
            sync(device)
            out[label] = n_batches * batch / (time.perf_counter() - t0)
        out["ratio"] = out["pneumo_predictor"] / out["plain_fp32_nchw"]
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--predict-batches", type=int, default=20)
    ap.add_argument("--predict-batch", type=int, default=256)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "model": a.model, "bf16_native": P.bf16_native(device)}
    res["train_plain_fp32_img_s"] = train_rate(a.model, device, a.steps, a.batch, amp=False)
    res["train_pneumo_amp_img_s"] = train_rate(a.model, device, a.steps, a.batch, amp=True)
    res["train_ratio"] = res["train_pneumo_amp_img_s"] / res["train_plain_fp32_img_s"]
    res["predict"] = predict_rates(a.model, device, a.predict_batches, a.predict_batch)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
