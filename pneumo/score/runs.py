"""Reading scoring results: the Delta table at `out`, its runs, and any earlier night.

    read_results(out)                          # latest committed row per path (pandas)
    read_results(out, as_of="2026-11-30T23:00:00Z")   # ... as the table was then (or version=N)
    read_committed(out)                        # every committed row (Arrow), a path once per run that scored it
    committed_runs(out)                        # the runs' records (counts, bundle, drift, config), oldest first
    upgrade(out)                               # bring old Parquet run folders into the table (pneumo score does it)

`out` is a folder, an `s3://` prefix (the AWS environment's endpoint) or a `pneumo.io.storage.Location`.
Any Delta reader sees the same committed rows: `deltalake.DeltaTable(out).to_pandas()`,
`polars.read_delta(out)`, `ray.data.read_delta(out)`. An `out` that holds only old run folders
(`<out>/runs/<run_id>/`, before the table) is read through `pneumo.score.legacy` until its first new run.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pneumo.io.storage import Location
from pneumo.score import legacy
from pneumo.score import table as T
from pneumo.score.legacy import BadRun, legacy_rows, legacy_runs

__all__ = ["BadRun", "committed_runs", "read_committed", "read_results", "run_rows", "run_version", "upgrade"]


def committed_runs(out: Location | str, *, bad: list[BadRun] | None = None) -> list[dict[str, Any]]:
    """The records of every committed run, oldest first: the table's (each with its commit
    `version` and `timestamp`), else the old run folders' markers (a damaged one is left out with
    a warning and appended to `bad`)."""
    out = Location.of(out)
    if T.exists(out):
        return [r for r in T.run_records(out) if r.get("kind") != "upgrade"]
    return legacy_runs(out, bad=bad)


def upgrade(out: Location | str, store: Location | None = None, *,
            bad: list[BadRun] | None = None) -> dict[str, Any] | None:
    """Bring the old Parquet run folders of `out` into a new table as its creating commit (once;
    `pneumo score` does it before its first run into such an `out`); see `pneumo.score.legacy`."""
    return legacy.upgrade(Location.of(out), store, bad=bad)


def run_version(out: Location | str, run_id: str) -> int:
    """The table version that `run_id` committed (for `read_results(out, version=...)`)."""
    return T.commit_version(Location.of(out), run_id)


def read_committed(out: Location | str, *, bad: list[BadRun] | None = None, version: int | None = None,
                   as_of: Any = None, columns: list[str] | None = None) -> pa.Table:
    """Every committed row (at `version`, or `as_of` a datetime / RFC 3339 time, when given)."""
    out = Location.of(out)
    if T.exists(out):
        return T.read_table(out, columns, version, as_of)
    if version is not None or as_of is not None:
        raise ValueError(f"{out} is not a Delta table yet (old run folders only): no versions to travel to")
    rows = legacy_rows(out, bad=bad)
    return rows.select(columns) if columns else rows


def run_rows(out: Location | str, run_id: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """(the rows, the record) of one committed run: `run_id`, else the latest. A ValueError when
    there is no such committed run."""
    import pyarrow.compute as pc

    runs = committed_runs(out)
    if not runs:
        raise ValueError(f"{out}: no committed scoring run (pneumo score ... --out {out})")
    chosen = runs[-1] if run_id is None else next((m for m in runs if m["run_id"] == run_id), None)
    if chosen is None:
        raise ValueError(f"{out}: no committed run {run_id!r}; committed: {', '.join(m['run_id'] for m in runs)}")
    rows = read_committed(out)
    return rows.filter(pc.equal(rows.column("run_id"), chosen["run_id"])), chosen


def read_results(out: Location | str, *, version: int | None = None, as_of: Any = None):  # noqa: ANN201 - pandas
    """Committed results as a pandas DataFrame: the latest row per path (by scored_at, then run_id),
    sorted by path; at `version` / `as_of` when given."""
    df = read_committed(out, version=version, as_of=as_of).to_pandas()
    if df.empty:
        return df
    df = df.sort_values(["scored_at", "run_id"], kind="stable")
    return df.drop_duplicates("path", keep="last").sort_values("path").reset_index(drop=True)
