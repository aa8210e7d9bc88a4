"""Training's cached-feature pass (the default recipe's only backbone pass), before against after.

    python benchmarks/bench_feature_cache.py [--n 512] [--threads 2] [--model efficientnet_lite0]

Before: eager torch, channels_last fp32 (what `cache_features` ran until the ONNX engine).
After:  `pneumo.feature_cache.backbone_features` as training runs it now: the scoring graph exported to
ONNX and run by the fastest ONNX engine at fp32 (checked against torch on the first batch).
Both on the same decoded real X-rays (../shared/data/chest_xray_224), batch 64, in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumo.io.reading import read_image  # noqa: E402
from pneumo.models.factory import get_model  # noqa: E402
from pneumo.models.zoo import get_spec  # noqa: E402
from pneumo.train.feature_cache import backbone_features  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/chest_xray_224/train"))
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = get_spec(a.model).input
    paths = sorted(Path(a.data).rglob("*.jpeg"))[:: max(1, len(list(Path(a.data).rglob("*.jpeg"))) // a.n)][: a.n]
    images = np.stack([read_image(str(p), spec).image for p in paths])
    labels = np.zeros(len(images), np.int64)
    batches = [{"image": torch.from_numpy(images[i:i + 64]), "label": torch.from_numpy(labels[i:i + 64])}
               for i in range(0, len(images), 64)]
    model = get_model(a.model, 2, weights="pretrained").eval().to(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    rates: dict[str, list[float]] = {"before (torch eager, channels_last)": [], "after (the engine)": []}
    for _ in range(a.repeats):  # interleaved, so load on the machine hits both alike
        for label, name in (("before (torch eager, channels_last)", None), ("after (the engine)", a.model)):
            t0 = time.perf_counter()
            feats, _ = backbone_features(model, batches, spec, cpu, "fp32", True, model_name=name,
                                         threads=a.threads)
            rates[label].append(len(feats) / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in rates.items()}
    for k, v in best.items():
        print(f"{k:<38} {v:7.1f} images/s  (runs: {', '.join(f'{r:.1f}' for r in rates[k])})")
    before, after = best.values()
    print(f"ratio after/before: {after / before:.2f}x  ({len(images)} real {spec.size}px X-rays, "
          f"{a.threads} threads, {a.model}; export + check included in 'after')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
