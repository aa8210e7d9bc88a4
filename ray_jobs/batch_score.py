"""Batch-score an archive of chest X-rays into a Delta Lake table with Ray Data (submittable entry point).

Locally (embedded Ray) or on a cluster, from the repository root:

    python ray_jobs/batch_score.py DATA --bundle BUNDLE --out OUT [--incremental] [--explain]

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python ray_jobs/batch_score.py s3://archive/xrays --bundle s3://models/effnet \\
        --out s3://scores/nightly --incremental --min-actors 1 --max-actors 4 --s3-endpoint http://S3:8333

Options are those of `pneumo score` (`python ray_jobs/batch_score.py --help`); `--config YAML`
takes the same keys. Under `ray job submit` the job connects to the cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, whatever the cwd

from pneumo.score.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
