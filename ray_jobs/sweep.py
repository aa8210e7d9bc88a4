"""Run a Ray Tune sweep of training runs (submittable entry point); the options of `pneumo sweep`.

    python ray_jobs/sweep.py ../shared/data/chest_xray_224 --config ray_jobs/sweeps/r5_cnn_ablation.yaml \\
        --out sweeps/r5 [--scheduler asha] [--tracking-uri http://mlflow:5000] [--register pneumo-cxr]

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/sweep.py s3://datasets/chest_xray --config ray_jobs/sweeps/r3_optimizers.yaml \\
        --out sweeps/r3 --s3-endpoint http://S3:8333 --tracking-uri http://mlflow:5000

Re-running the same command after an interruption resumes the sweep (Tuner.restore).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, whatever the cwd

from pneumo.train.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
