"""Committed scoring runs: the `_SUCCESS.json` markers, the readers and `--incremental`'s bookkeeping.

A run is `<out>/runs/<run_id>/part-*.parquet` plus `_SUCCESS.json`, written last, atomically.
Readers trust only runs with a marker; a marker that does not parse, or whose parts are missing
or unreadable, makes the run *damaged*: readers skip it with a warning (`bad=[]` lists them) and
never raise, so its files are scored again by the next `--incremental` run.

    read_results(out)        # latest committed row per path (pandas)
    read_committed(out)      # every committed row
    committed_runs(out)      # the markers, oldest first
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pneumo.data.listing import ImageRecord
from pneumo.io.reading import read_file
from pneumo.io.storage import Location
from pneumo.ray_env import ensure_ray
from pneumo.score.config import Pipeline
from pneumo.score.tasks import OUTPUT_SCHEMA, RETRY_KINDS, num_blocks

log = logging.getLogger(__name__)
SUCCESS_FILE = "_SUCCESS.json"
RUNS_DIR = "runs"


def part_names():  # noqa: ANN201 - a Ray FilenameProvider
    from ray.data.datasource import (
        FilenameProvider,  # start-up time: readers of results need no Ray
    )

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}-{write_uuid}.parquet"

    return PartNames(file_format="parquet")


@dataclass(frozen=True)
class BadRun:
    """A run folder with a `_SUCCESS.json` that readers cannot trust, and why (no input names)."""

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


def committed_runs(out: Location | str, *, bad: list[BadRun] | None = None) -> list[dict[str, Any]]:
    """The `_SUCCESS.json` markers of every committed run under `<out>/runs/`, oldest first.

    A run folder without a marker is not committed (killed or still running) and is left out
    silently. A marker that does not parse, or whose listed parts are missing or have no
    readable Parquet footer, is left out with a warning and appended to `bad`: readers never
    raise on a damaged run, and `--incremental` scores its files again."""
    runs = Location.of(out).join(RUNS_DIR)
    markers = []
    for run_id in runs.folders():
        run_dir = runs.join(run_id)
        if not run_dir.join(SUCCESS_FILE).exists():
            continue  # not committed: killed or still running
        try:
            markers.append(_check_marker(run_dir))
        except Exception as exc:  # noqa: BLE001 - torn marker, missing or torn part, S3 trouble
            _ignore(bad, run_id, exc)
    return sorted(markers, key=lambda m: (m["finished_at"], m["run_id"]))


def list_parts(run_dir: Location) -> list[str]:
    """The Parquet part files in a run folder (committed or not)."""
    return run_dir.files(".parquet")


def read_parts(run_dir: Location, files: list[str]) -> pa.Table:
    """The rows of a run's parts, in the output schema."""
    tables = [pq.read_table(run_dir.join(name).path, filesystem=run_dir.fs, schema=OUTPUT_SCHEMA) for name in files]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def read_committed(out: Location | str, *, bad: list[BadRun] | None = None) -> pa.Table:
    """Every row of every committed run, oldest run first (a path may appear once per run). A run
    whose parts cannot be read is left out whole, like a damaged marker (see `committed_runs`)."""
    runs = Location.of(out).join(RUNS_DIR)
    tables = []
    for m in committed_runs(out, bad=bad):
        try:
            tables.append(read_parts(runs.join(m["run_id"]), m["files"]))
        except Exception as exc:  # noqa: BLE001 - a part torn past its footer
            _ignore(bad, m["run_id"], exc)
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def run_rows(out: Location | str, run_id: str | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """(the rows, the marker) of one committed run: `run_id`, else the latest. A `DataError`-like
    ValueError when there is no such committed run."""
    runs = committed_runs(out)
    if not runs:
        raise ValueError(f"{out}: no committed scoring run (pneumo score ... --out {out})")
    chosen = runs[-1] if run_id is None else next((m for m in runs if m["run_id"] == run_id), None)
    if chosen is None:
        raise ValueError(f"{out}: no committed run {run_id!r}; committed: {', '.join(m['run_id'] for m in runs)}")
    return read_parts(Location.of(out).join(RUNS_DIR, chosen["run_id"]), chosen["files"]), chosen


def read_results(out: Location | str):  # noqa: ANN201 - pandas.DataFrame
    """Committed results as a pandas DataFrame: the latest row per path (by scored_at, then run_id).
    `out` is a folder, an `s3://` prefix (the AWS environment's endpoint) or a `Location`."""
    df = read_committed(out).to_pandas()
    if df.empty:
        return df
    df = df.sort_values(["scored_at", "run_id"], kind="stable")
    return df.drop_duplicates("path", keep="last").sort_values("path").reset_index(drop=True)


def already_scored(out: Location | str, bundle_sha256: str, *,
                   bad: list[BadRun] | None = None) -> dict[tuple[str, int, int], str | None]:
    """(path, size, mtime_ns) -> sha256 of the bytes (`etag_or_sha256`, None where the file was
    never read) for files that committed runs scored with this bundle, the latest run's row per
    key; rows of retried error kinds (`RETRY_KINDS`) are left out, so those files are scored again."""
    t = read_committed(out, bad=bad)
    done: dict[tuple[str, int, int], str | None] = {}
    cols = ["path", "size_bytes", "mtime_ns", "etag_or_sha256", "bundle_sha256", "error_kind"]
    for row in t.select(cols).to_pylist():  # oldest run first: a later row for the same key wins
        key = (row["path"], row["size_bytes"], row["mtime_ns"])
        if row["bundle_sha256"] != bundle_sha256:
            continue
        if row["error_kind"] in RETRY_KINDS:
            done.pop(key, None)
        else:
            done[key] = row["etag_or_sha256"]
    return done


def _same_content(batch: dict[str, np.ndarray], store: Location) -> dict[str, np.ndarray]:
    """Ray Data task: for each (path, sha256 committed for it), whether the bytes now hash the same
    (False when they cannot be read: the file is scored again and gets its error row)."""
    same = np.zeros(len(batch["path"]), dtype=bool)
    for i, (path, sha) in enumerate(zip(batch["path"], batch["sha256"])):
        try:
            same[i] = hashlib.sha256(read_file(store.at(str(path)))).hexdigest() == sha
        except Exception:  # noqa: BLE001, S112 - unreadable now: not unchanged
            continue
    return {"path": np.asarray(batch["path"], dtype=object), "same": same}


def unchanged_files(cfg: Pipeline, store: Location, records: list[ImageRecord],
                    done: dict[tuple[str, int, int], str | None]) -> set[str]:
    """`--incremental`: the paths among `records` whose content is what a committed run scored.

    (path, size, mtime) is only a pre-filter: a key no committed row has is scored without
    reading twice. A key that matches is confirmed by content: Ray Data tasks read and sha256 the
    bytes and compare them with the committed row's `etag_or_sha256`, because a same-size
    replacement can keep the old mtime (`cp -p`, rsync, a DICOM re-export). A committed row with
    no hash (a folder entry, never read) is matched by its key alone."""
    import ray

    known = {r.path: done[(r.path, r.size, r.mtime_ns)] for r in records if (r.path, r.size, r.mtime_ns) in done}
    unchanged = {path for path, sha in known.items() if sha is None}
    items = [{"path": path, "sha256": sha} for path, sha in known.items() if sha is not None]
    if items:
        ensure_ray()
        ds = ray.data.from_items(items, override_num_blocks=num_blocks(len(items), cfg.read_batch_size))
        ds = ds.map_batches(_same_content, fn_kwargs={"store": store},
                            batch_size=cfg.read_batch_size, batch_format="numpy", num_cpus=cfg.read_cpus)
        unchanged |= {str(row["path"]) for row in ds.take_all() if row["same"]}
    return unchanged
