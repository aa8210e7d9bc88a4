"""`pneumo sample`: which images of a scored run a radiologist should label, to validate a bundle at a site.

    pneumo sample SCORES --n 50 --out sample.csv [--run-id ID] [--drifted 0.25]

`SCORES` is the `--out` of `pneumo score` (its latest committed run, or `--run-id`). Of the run's
scored images, the sample takes:

- `1 - drifted` of them spread over the score range: the ok rows sorted by score, cut into equal
  strata, one picked at random (seeded) per stratum, so the sample's scores are distributed like
  the archive's (its sensitivity and specificity are close to what a random sample would give);
- `drifted` of them the farthest from the training data: the largest mean distance to the 10
  nearest reference embeddings (the bundle's drift reference, in its PCA space), where the model
  is least sure to know what it sees. These over-represent unusual images, on purpose.

It writes a CSV (`path, probability, predicted, reason, drift_distance, label`) with full paths (the
site's own data; they are never printed or logged) and an empty `label` column. Fill it in with
NORMAL or PNEUMONIA (or copy the files into `NORMAL/` and `PNEUMONIA/` folders), then:
`pneumo calibrate BUNDLE sample.csv --out NEW_BUNDLE`.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pneumo.bundle.manifest import BundleError, drift_reference, read_manifest
from pneumo.config import ConfigError, parse_config
from pneumo.io.storage import Location
from pneumo.score.runs import run_rows

NEIGHBOURS = 10
COLUMNS = ("path", "probability", "predicted", "reason", "drift_distance", "label")


@dataclass
class SampleConfig:
    """Pick the images of a scored run a radiologist should label to validate the bundle at this site."""

    scores: str = field(metadata={"positional": True, "help": "the --out folder (or s3:// prefix) of pneumo score"})
    out: str = field(default="", metadata={"help": "the CSV to write (required)"})
    n: int = field(default=50, metadata={"help": "images to pick"})
    run_id: str | None = field(default=None, metadata={"help": "the run to sample (default: the latest committed)"})
    bundle: str | None = field(default=None, metadata={"help": "the bundle whose drift reference measures "
                                                                "distance (default: the one the run scored with)"})
    drifted: float = field(default=0.25, metadata={"help": "share of the picks farthest from the training data"})
    seed: int = 0
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("out: required (--out sample.csv)")
        if self.n < 1 or not 0 <= self.drifted <= 1:
            raise ConfigError(f"need n >= 1 and 0 <= drifted <= 1 (got n={self.n}, drifted={self.drifted})")


def drift_distances(embeddings: list[Any], reference: Any) -> np.ndarray | None:
    """Mean distance of each embedding to its nearest reference embeddings (scikit-learn's
    NearestNeighbors), or None when any row has no embedding or there is no reference."""
    if reference is None or not embeddings or any(e is None for e in embeddings) or len(reference.sample) < 2:
        return None
    from sklearn.neighbors import NearestNeighbors

    k = min(NEIGHBOURS, len(reference.sample))
    dist, _ = NearestNeighbors(n_neighbors=k).fit(reference.sample).kneighbors(np.asarray(embeddings, np.float32))
    return dist.mean(axis=1)


def pick(scores: np.ndarray, distances: np.ndarray | None, n: int, drifted: float, seed: int) -> dict[int, str]:
    """{row index: reason}: the most drifted rows first, then one per score stratum among the rest."""
    rng = np.random.default_rng(seed)
    n = min(n, len(scores))
    chosen: dict[int, str] = {}
    if distances is not None:
        for i in np.argsort(-distances, kind="stable")[: int(round(n * drifted))]:
            chosen[int(i)] = "most_drifted"
    rest = np.array([i for i in np.argsort(scores, kind="stable") if int(i) not in chosen], dtype=np.int64)
    for stratum in np.array_split(rest, n - len(chosen)) if n > len(chosen) else []:
        if len(stratum):
            chosen[int(rng.choice(stratum))] = "score_range"
    return chosen


def run_sample(cfg: SampleConfig) -> dict[str, int]:
    scores_at = Location.resolve(cfg.scores, cfg.s3_endpoint)
    try:
        table, marker = run_rows(scores_at, cfg.run_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ok = table.filter(pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("probability"))))
    if ok.num_rows == 0:
        raise ConfigError(f"run {marker['run_id']}: no scored images to sample")
    bundle = Location.resolve(cfg.bundle or marker["bundle"], cfg.s3_endpoint)
    reference = drift_reference(bundle, read_manifest(bundle))
    probability = np.asarray(ok.column("probability").to_numpy(zero_copy_only=False), dtype=np.float64)
    distances = drift_distances(ok.column("embedding").to_pylist(), reference)
    chosen = pick(probability, distances, cfg.n, cfg.drifted, cfg.seed)
    Location.resolve(cfg.out, cfg.s3_endpoint).write_bytes(_csv(ok, chosen, distances))
    reasons = {r: sum(1 for v in chosen.values() if v == r) for r in ("score_range", "most_drifted")}
    print(f"[pneumo sample] wrote {cfg.out}: {len(chosen)} of the {ok.num_rows} scored images of run "
          f"{marker['run_id']} ({reasons['score_range']} across the score range, {reasons['most_drifted']} farthest "
          f"from the training data{'' if distances is not None else ': none, the run has no embeddings'}).\n"
          f"  next: fill in the label column (NORMAL or PNEUMONIA), then "
          f"pneumo calibrate {marker['bundle']} {cfg.out} --out NEW_BUNDLE", flush=True)
    return reasons


def _csv(rows: pa.Table, chosen: dict[int, str], distances: np.ndarray | None) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    paths, probs, labels = (rows.column(c).to_pylist() for c in ("path", "probability", "label"))
    for i, reason in sorted(chosen.items(), key=lambda kv: (kv[1], probs[kv[0]])):
        distance = "" if distances is None else f"{distances[i]:.4f}"
        w.writerow([paths[i], f"{probs[i]:.6f}", labels[i], reason, distance, ""])
    return buf.getvalue().encode()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SampleConfig, argv, prog="pneumo sample")
    try:
        run_sample(cfg)
    except (ConfigError, BundleError) as exc:
        print(f"pneumo sample: error: {exc}", file=sys.stderr)
        return 2
    return 0
