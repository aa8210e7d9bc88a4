"""Evaluate a model bundle on a labelled split: metrics with bootstrap 95% CIs, report and plots.

    python ray_jobs/evaluate.py runs/demo/bundle ../shared/data/chest_xray_224 --split test --out runs/demo/eval

(the same as `pneumo evaluate BUNDLE DATA --split test --out DIR`; add `--s3-endpoint http://host:8333`
for s3:// locations). The val/test carve-out is read from the bundle's training config, so the
split is the one training held out. It runs on Ray Data like batch scoring (read tasks, then a
model actor pool), on RAY_ADDRESS's cluster under `ray job submit`, else on an embedded local Ray.
Options: `python ray_jobs/evaluate.py --help`.
"""

import sys

from pneumo.score.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
