"""Train a pneumonia classifier with Ray Train and export a model bundle (submittable entry point).

Locally (embedded Ray) or on a cluster, from the repository root:

    python ray_jobs/train.py ../shared/data/chest_xray_224 \\
        --config ray_jobs/recipes/efficientnet_lite0.yaml --out runs/lite0

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/train.py s3://datasets/chest_xray --config ray_jobs/recipes/seed_cnn.yaml \\
        --out runs/seed_cnn --storage-path s3://runs/ray --name seed-cnn-1 \\
        --s3-endpoint http://S3:8333 --num-workers 4 [--gpus-per-worker 1]

Options are those of `pneumo train` (`python ray_jobs/train.py --help`); `--config YAML` takes the
same keys and flags override it. Re-running with the same `--name` and `--storage-path` resumes
from the latest checkpoint. Under `ray job submit` the job connects through RAY_ADDRESS.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, whatever the cwd

from pneumo.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
