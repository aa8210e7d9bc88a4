"""A scoring run's drift files: `drift.json` + `drift.png` beside the run, from its ok rows.

    verdict = run_drift(bundle_manifest, reference, run_dir, table)   # the verdict as a dict

The statistics are `pneumo.monitor.drift.compare`; this module only turns a run's rows into its
inputs and writes the two files (each atomically, local or S3).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pneumo.io.storage import Location
from pneumo.monitor.drift import DriftReference, DriftReport, compare
from pneumo.report.plots import drift_plot

NO_REFERENCE_LINE = "drift: not judged (no reference in this bundle; retrain or re-export to add one)"


def ok_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table.column("status"), "ok"))


def write_run_drift(run_dir: Location | str, reference: DriftReference, features: np.ndarray | None,
                    scores: np.ndarray, projected: bool = False, **kwargs: Any) -> DriftReport:
    """`compare` over a run's ok rows (`features`: their embeddings, already on the reference's
    PCA with `projected=True`; None for scores only); writes `<run_dir>/drift.json` and `drift.png`."""
    run_dir = Location.of(run_dir)
    s = np.asarray(scores, dtype=np.float32).ravel()
    projected = reference.project(features) if features is not None and not projected and len(s) else features
    report = compare(reference, projected, s, projected=True, **kwargs)
    run_dir.join("drift.json").write_bytes((json.dumps(report.to_dict(), indent=2) + "\n").encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = drift_plot(reference.scores, s, Path(tmp) / "drift.png", reference.threshold,
                         reference.sample, projected, title=report.line())
        run_dir.join("drift.png").write_bytes(Path(png).read_bytes())
    return report


def write_no_reference(run_dir: Location) -> dict[str, Any]:
    """`<run_dir>/drift.json` for a bundle without a drift reference (older bundles): never an alarm."""
    d = {"shift": False, "status": "no_reference", "reason": "no reference in this bundle", "line": NO_REFERENCE_LINE}
    run_dir.join("drift.json").write_bytes((json.dumps(d, indent=2) + "\n").encode())
    return d


def run_drift(reference: DriftReference | None, run_dir: Location, table: pa.Table) -> dict[str, Any]:
    """drift.json (+ drift.png) for the run's ok rows, before the commit; the verdict as a dict."""
    path = run_dir.join("drift.json").uri
    if reference is None:
        return {**write_no_reference(run_dir), "path": path}
    ok = ok_rows(table)
    scores = np.asarray(ok.column("probability").to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = ok.column("embedding").combine_chunks()
    k = reference.components.shape[0]
    projected = (np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ok), k)
                 if emb.null_count == 0 else None)  # scores only if any row lacks its embedding
    report = write_run_drift(run_dir, reference, projected, scores, projected=True)
    return {**report.to_dict(), "path": path, "plot": run_dir.join("drift.png").uri}
