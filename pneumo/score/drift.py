"""A scoring run's drift files: `drift.json` + `drift.png` in the run's side folder, from its ok rows.

    verdict, warnings = run_drift(reference, run_dir, sample)   # the verdict as a dict; what failed

The statistics are `pneumo.monitor.drift.compare`; this module only turns a run's rows (a uniform
sample of at most `pneumo.score.parts.SAMPLE_ROWS` ok rows: all of them in all but huge runs) into
its inputs and writes the two files (each atomically, local or S3). A file that cannot be written
is a warning, never a lost verdict or a lost run.
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


def _write(what: str, write: Any, warnings: list[str]) -> None:
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - a late file must not cost the run its rows
        warnings.append(f"{what} not written ({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})"[:300])


def write_run_drift(run_dir: Location | str, reference: DriftReference, features: np.ndarray | None,
                    scores: np.ndarray, projected: bool = False, warnings: list[str] | None = None,
                    **kwargs: Any) -> DriftReport:
    """`compare` over a run's ok rows (`features`: their embeddings, already on the reference's
    PCA with `projected=True`; None for scores only); writes `<run_dir>/drift.json` and `drift.png`
    (a file that cannot be written goes to `warnings` when given, else raises)."""
    run_dir = Location.of(run_dir)
    s = np.asarray(scores, dtype=np.float32).ravel()
    projected = reference.project(features) if features is not None and not projected and len(s) else features
    report = compare(reference, projected, s, projected=True, **kwargs)
    strict = warnings is None
    warnings = [] if warnings is None else warnings

    def plot() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            png = drift_plot(reference.scores, s, Path(tmp) / "drift.png", reference.threshold,
                             reference.sample, projected, title=report.line())
            run_dir.join("drift.png").write_bytes(Path(png).read_bytes())

    _write("drift.json", lambda: run_dir.join("drift.json").write_bytes(
        (json.dumps(report.to_dict(), indent=2) + "\n").encode()), warnings)
    _write("drift.png", plot, warnings)
    if strict and warnings:
        raise OSError("; ".join(warnings))
    return report


def run_drift(reference: DriftReference | None, run_dir: Location, table: pa.Table) -> tuple[dict[str, Any], list[str]]:
    """drift.json (+ drift.png) for the run's ok rows (`table`, or a sample of them), before the
    commit; (the verdict as a dict, the files that could not be written)."""
    warnings: list[str] = []
    path = run_dir.join("drift.json").uri
    if reference is None:
        d = {"shift": False, "status": "no_reference", "reason": "no reference in this bundle", "line": NO_REFERENCE_LINE}
        _write("drift.json", lambda: run_dir.join("drift.json").write_bytes((json.dumps(d, indent=2) + "\n").encode()),
               warnings)
        return {**d, "path": path}, warnings
    ok = ok_rows(table)
    scores = np.asarray(ok.column("probability").to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = ok.column("embedding").combine_chunks()
    k = reference.components.shape[0]
    projected = (np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ok), k)
                 if emb.null_count == 0 else None)  # scores only if any row lacks its embedding
    report = write_run_drift(run_dir, reference, projected, scores, projected=True, warnings=warnings)
    return {**report.to_dict(), "path": path, "plot": run_dir.join("drift.png").uri}, warnings
