"""The results table: a Delta Lake table at `--out` (a folder or `s3://` prefix), one commit per run.

    sink = PartSink(out, run_id, schema); ds.write_datasink(sink)   # pneumo.score.parts: files, not visible yet
    version = commit(out, sink.parts, schema, record)               # one atomic commit: the rows + the run's record
    read_table(out, version=3) / read_table(out, as_of="2026-11-30T23:00:00Z")   # any earlier night
    run_records(out)                                        # the runs, oldest first, from the commits' metadata

Why not `Dataset.write_delta`: it commits inside the write, before the run has checked exactly one
row per input file, judged drift or re-weighted the probabilities (`--adapt`), and it cannot put
the run's record in the commit. So Ray Data tasks write the Parquet files (`pneumo.score.parts.PartSink`) and the driver
commits them with deltalake (`commit`): counts, bundle, drift verdict and config go into the commit's
metadata (`commitInfo["pneumo"]`), a Delta app transaction (`pneumo-run-<run_id>`) makes a run id
commit at most once, and delta-rs retries a commit that lost a race, so two runs appending at once
both land (local disk: atomic rename; S3: conditional PUT `If-None-Match`, which delta-rs 1.x uses
natively; no lock table needed). Files of a run that never commits are in no commit, so no Delta
reader sees them; a failing run deletes its own (`remove_uncommitted`), a killed run's stay until
`DeltaTable(out).vacuum(full=True)`. Side files (drift.json, drift.png, overlays, an adapted bundle)
live under `<out>/_pneumo/runs/<run_id>/`, a folder every table reader ignores.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pneumo.io.storage import Location

META_DIR = "_pneumo"  # beside the data files; Delta readers read only what the log names
RECORD_KEY = "pneumo"  # the commitInfo key holding a run's record
COMMIT_RETRIES = 100  # delta-rs retries a commit that lost a race this often (appends never conflict)


class RunExists(ValueError):
    """A run id that a commit of the table already holds."""


def app_id(run_id: str) -> str:
    return f"pneumo-run-{run_id}"


def run_folder(out: Location, run_id: str) -> Location:
    """The run's side folder: drift files, overlays, an adapted bundle (never read as table data)."""
    return out.join(META_DIR, "runs", run_id)


def part_prefix(run_id: str) -> str:
    return f"part-{run_id}-"


def exists(out: Location) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(out.uri, storage_options=out.storage_options())


def open_table(out: Location, version: int | None = None, as_of: Any = None) -> Any:
    """The `deltalake.DeltaTable` at `out`, at its latest version, a `version`, or as of a time
    (`datetime` or RFC 3339 text)."""
    from deltalake import DeltaTable

    dt = DeltaTable(out.uri, version=version, storage_options=out.storage_options())
    if as_of is not None:
        dt.load_as_version(as_of)
    return dt


def read_table(out: Location, columns: list[str] | None = None, version: int | None = None,
               as_of: Any = None) -> pa.Table:
    """Every committed row (at `version` / `as_of` when given) as an Arrow table."""
    return open_table(out, version, as_of).to_pyarrow_table(columns=columns)


def is_committed(out: Location, run_id: str) -> bool:
    return exists(out) and open_table(out).transaction_version(app_id(run_id)) is not None


def run_records(out: Location) -> list[dict[str, Any]]:
    """The record of every run in the table's commits, oldest first, each with its `version` and
    commit `timestamp` (ms); an upgrade commit holds several (the old Parquet runs it brought in)."""
    if not exists(out):
        return []
    records = []
    for commit in reversed(open_table(out).history()):
        meta = commit.get(RECORD_KEY)
        if not isinstance(meta, dict):
            continue
        for rec in meta.get("runs", [meta]):
            records.append({**rec, "version": commit["version"], "timestamp": commit.get("timestamp")})
    return records


def history_dataset(out: Location, columns: list[str]) -> Any:
    """The committed rows' `columns` as a lazy Ray Dataset (`ray.data.read_delta`)."""
    import ray

    return ray.data.read_delta(out.uri, columns=columns, storage_options=out.storage_options())


def n_rows(out: Location) -> int:
    """Committed rows, from the log's file statistics (no data read)."""
    actions = pa.table(open_table(out).get_add_actions(flatten=True))
    return int(pc.sum(actions.column("num_records")).as_py() or 0) if actions.num_rows else 0


def json_safe(value: Any) -> Any:
    """`value` as commit metadata: JSON types only, NaN and infinities as None (Delta refuses them)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return json_safe(json.loads(json.dumps(value, default=str)))


def _actions(parts: list[dict[str, Any]]) -> list[Any]:
    from deltalake.transaction import AddAction

    now = int(time.time() * 1000)
    return [AddAction(path=p["path"], size=int(p["size"]), partition_values={}, modification_time=now,
                      data_change=True, stats=json.dumps({"numRecords": int(p["rows"])})) for p in parts]


class TableExists(RuntimeError):
    """`commit(create_only=True)` found a table already there (a concurrent creator won)."""


def commit(out: Location, parts: list[dict[str, Any]], schema: pa.Schema, record: dict[str, Any],
           create_only: bool = False) -> int:
    """Commit `parts` (written by `pneumo.score.parts.PartSink`) as one transaction carrying
    `record`; its version. The first commit creates the table, exclusively: a concurrent
    creator's loser appends instead (or, with `create_only`, raises `TableExists`)."""
    from deltalake import Schema
    from deltalake.transaction import CommitProperties, Transaction, create_table_with_add_actions

    run_ids = [record["run_id"], *[r["run_id"] for r in record.get("runs", [])]]
    props = CommitProperties(custom_metadata={RECORD_KEY: json_safe(record)}, max_commit_retries=COMMIT_RETRIES,
                             app_transactions=[Transaction(app_id(r), 1) for r in run_ids])
    if not exists(out):
        try:
            create_table_with_add_actions(out.uri, Schema.from_arrow(schema), _actions(parts), mode="error",
                                          storage_options=out.storage_options(), commit_properties=props)
            return 0
        except Exception:
            if not exists(out):
                raise  # not a lost race for creation
    if create_only:
        raise TableExists(f"{out} is a table already")
    dt = open_table(out)
    if dt.transaction_version(app_id(record["run_id"])) is not None:
        raise RunExists(f"run {record['run_id']} is already committed to {out}")
    dt.create_write_transaction(_actions(parts), "append", schema, commit_properties=props)
    return commit_version(out, record["run_id"])


def commit_version(out: Location, run_id: str) -> int:
    """The version of the commit holding `run_id` (searched from the newest)."""
    for limit in (16, None):
        for c in open_table(out).history(limit):
            meta = c.get(RECORD_KEY)
            if isinstance(meta, dict) and run_id in [r.get("run_id") for r in meta.get("runs", [meta])]:
                return int(c["version"])
    raise RuntimeError(f"run {run_id}: committed, but no commit names it")


def remove_uncommitted(out: Location, run_id: str, keep: set[str] = frozenset()) -> int:
    """Delete the data files of `run_id` that no commit names (a failed run's, or a retried write
    task's leftovers), except `keep`; how many. Only this run's names: a concurrent run's files are safe."""
    doomed = [name for name in out.files(".parquet") if name.startswith(part_prefix(run_id)) and name not in keep]
    for name in doomed:
        out.join(name).delete()
    return len(doomed)
