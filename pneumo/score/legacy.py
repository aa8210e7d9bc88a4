"""The old output format, Parquet run folders, read and brought into the table once (`upgrade`).

Before the Delta table, a run was `<out>/runs/<run_id>/part-*.parquet` plus `_SUCCESS.json`, written
last. A run folder without a marker was never committed (killed) and is not history. A marker that
does not parse, or whose parts are missing or unreadable, made the run *damaged*: readers skip it
with a warning (`bad=[]` lists them), never raise, so its files are scored again.

`upgrade(out)` (run by the first `pneumo score` into such an `out`) makes those committed runs the
table's creating commit, exclusively (a concurrent upgrader loses the creation and adds nothing).
Each old row is fingerprinted on the way (Ray Data tasks): a file whose size and mtime are still the
row's and whose bytes still hash to its sha256 gets today's ctime and inode (its ETag on S3), so the
next `--incremental` run skips it from the listing alone; any other keeps -1s and is scored again.
That is one more read of the archive, once. The run folders stay where they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pneumo.data.listing import stat_path
from pneumo.io.reading import read_file
from pneumo.io.storage import Location
from pneumo.score.table import commit, exists, remove_uncommitted
from pneumo.score.tasks import OUTPUT_SCHEMA

log = logging.getLogger("pneumo.score.runs")  # one logger for every reader of results
SUCCESS_FILE = "_SUCCESS.json"
RUNS_DIR = "runs"


@dataclass(frozen=True)
class BadRun:
    """An old run folder with a `_SUCCESS.json` that readers cannot trust, and why (no input names)."""

    run_id: str
    reason: str


def _ignore(bad: list[BadRun] | None, run_id: str, exc: BaseException) -> None:
    """Report a damaged run: one warning line (run id and reason) and an entry in `bad`."""
    entry = BadRun(run_id, f"{type(exc).__name__}: {exc}"[:300])
    log.warning("ignoring run %s: %s (its files are scored again by --incremental)", entry.run_id, entry.reason)
    if bad is not None:
        bad.append(entry)


def _check_marker(run_dir: Location) -> dict[str, Any]:
    """The run's marker, if it parses and every part it lists is there with a readable Parquet
    footer, the parts' rows adding up to the marker's `n_scored`; raises otherwise."""
    run_id = run_dir.name
    marker = json.loads(run_dir.join(SUCCESS_FILE).read_bytes())
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list) \
            or not isinstance(marker.get("finished_at"), str):
        raise ValueError("marker is not a run record (files, finished_at)")
    if marker.get("run_id") != run_id:
        raise ValueError(f"marker names run {marker.get('run_id')!r}, not its folder")
    rows = 0
    for name in marker["files"]:
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad part name {name!r}")
        rows += pq.read_metadata(run_dir.join(name).path, filesystem=run_dir.fs).num_rows
    if isinstance(marker.get("n_scored"), int) and rows != marker["n_scored"]:
        raise ValueError(f"parts hold {rows} rows, the marker says {marker['n_scored']}")
    return marker


def legacy_runs(out: Location, *, bad: list[BadRun] | None = None) -> list[dict[str, Any]]:
    """The `_SUCCESS.json` markers of the trusted old runs under `<out>/runs/`, oldest first (see the module doc)."""
    runs = out.join(RUNS_DIR)
    markers = []
    for run_id in runs.folders():
        run_dir = runs.join(run_id)
        if not run_dir.join(SUCCESS_FILE).exists():
            continue  # not committed: killed
        try:
            markers.append(_check_marker(run_dir))
        except Exception as exc:  # noqa: BLE001 - torn marker, missing or torn part, S3 trouble
            _ignore(bad, run_id, exc)
    return sorted(markers, key=lambda m: (m["finished_at"], m["run_id"]))


def read_part(part: Location) -> pa.Table:
    """An old part in today's schema: columns it predates are null (ctime_ns and inode -1)."""
    t = pq.read_table(part.path, filesystem=part.fs, schema=OUTPUT_SCHEMA)
    for name in ("ctime_ns", "inode"):
        t = t.set_column(t.schema.get_field_index(name), name, pc.fill_null(t.column(name), -1))
    return t


def legacy_rows(out: Location, *, bad: list[BadRun] | None = None) -> pa.Table:
    """Every row of every trusted old run, oldest run first (a run whose parts cannot be read is left out whole)."""
    tables = []
    for m in legacy_runs(out, bad=bad):
        try:
            tables.append(pa.concat_tables([read_part(out.join(RUNS_DIR, m["run_id"], f)) for f in m["files"]]
                                           or [OUTPUT_SCHEMA.empty_table()]))
        except Exception as exc:  # noqa: BLE001 - a part torn past its footer
            _ignore(bad, m["run_id"], exc)
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def _fingerprinted(t: pa.Table, store: Location) -> pa.Table:
    """Old rows with today's ctime/inode/ETag where the file is provably the one scored (module doc)."""
    rows = t.select(["path", "size_bytes", "mtime_ns", "etag_or_sha256"]).to_pylist()
    ctime, inode, etag = t.column("ctime_ns").to_pylist(), t.column("inode").to_pylist(), t.column("etag").to_pylist()
    for i, row in enumerate(rows):
        if row["etag_or_sha256"] is None:
            continue
        _, size, mtime, c, ino, tag = stat_path(store, row["path"])
        if (size, mtime) != (row["size_bytes"], row["mtime_ns"]):
            continue
        try:
            same = hashlib.sha256(read_file(store.at(row["path"]))).hexdigest() == row["etag_or_sha256"]
        except Exception:  # noqa: BLE001, S112 - unreadable now: scored again
            continue
        if same:
            ctime[i], inode[i], etag[i] = c, ino, tag
    for name, values in (("ctime_ns", ctime), ("inode", inode), ("etag", etag)):
        t = t.set_column(t.schema.get_field_index(name), OUTPUT_SCHEMA.field(name), pa.array(values, OUTPUT_SCHEMA.field(name).type))
    return t


def _upgrade_parts(batch: pa.Table, store: Location) -> pa.Table:
    """Ray Data task: the rows of the old parts named in `batch`, fingerprinted."""
    parts = [read_part(store.at(uri)) for uri in batch.column("part").to_pylist()]
    return _fingerprinted(pa.concat_tables(parts), store) if parts else OUTPUT_SCHEMA.empty_table()


def upgrade(out: Location, store: Location | None = None, *, bad: list[BadRun] | None = None) -> dict[str, Any] | None:
    """Bring the old committed runs under `<out>/runs/` into a new table as its creating commit
    (module doc); their inputs are looked up on `store` (default: `out`'s endpoint). The upgrade's
    record, or None when there is a table already or no old run to bring in."""
    if exists(out):
        return None
    markers = legacy_runs(out, bad=bad)
    if not markers:
        return None
    import ray

    from pneumo.ray_env import ensure_ray
    from pneumo.score.parts import PartSink

    ensure_ray()
    parts = [{"part": out.join(RUNS_DIR, m["run_id"], name).uri} for m in markers for name in m["files"]]
    upgrade_id = f"upgrade-{uuid.uuid4().hex[:8]}"
    ds = ray.data.from_items(parts, override_num_blocks=max(1, len(parts))).map_batches(
        _upgrade_parts, batch_size=1, batch_format="pyarrow", fn_kwargs={"store": store or out})
    sink = PartSink(out, upgrade_id, OUTPUT_SCHEMA)
    record = {"run_id": upgrade_id, "kind": "upgrade", "runs": [{**m, "upgraded_from": f"{RUNS_DIR}/{m['run_id']}"}
                                                                 for m in markers]}
    try:
        ds.write_datasink(sink)
        commit(out, sink.parts, OUTPUT_SCHEMA, record, create_only=True)
    except Exception:
        remove_uncommitted(out, upgrade_id)
        if exists(out):
            log.info("another run upgraded %s first", out)
            return None
        raise
    remove_uncommitted(out, upgrade_id, keep={p["path"] for p in sink.parts})
    return record
