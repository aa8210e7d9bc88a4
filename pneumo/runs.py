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
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pneumo.data import ImageRecord, join, resolve_filesystem
from pneumo.reading import read_bytes_of
from pneumo.score_tasks import OUTPUT_SCHEMA, RETRY_KINDS, _ensure_ray

if TYPE_CHECKING:
    from pneumo.scoring import ScoreConfig

log = logging.getLogger(__name__)
SUCCESS_FILE = "_SUCCESS.json"
RUNS_DIR = "runs"


def _part_names():  # noqa: ANN202 - a Ray FilenameProvider, imported lazily
    from ray.data.datasource import FilenameProvider

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


def _check_marker(fs: pafs.FileSystem, run_path: str, run_id: str) -> dict[str, Any]:
    """The run's marker, if it parses and every part it lists is there with a readable Parquet
    footer, the parts' rows adding up to the marker's `n_scored`; raises otherwise."""
    with fs.open_input_stream(f"{run_path}/{SUCCESS_FILE}") as f:
        marker = json.loads(f.read())
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list) \
            or not isinstance(marker.get("finished_at"), str):
        raise ValueError("marker is not a run record (files, finished_at)")
    if marker.get("run_id") != run_id:
        raise ValueError(f"marker names run {marker.get('run_id')!r}, not its folder")
    rows = 0
    for name in marker["files"]:
        if not isinstance(name, str) or "/" in name:
            raise ValueError(f"bad part name {name!r}")
        rows += pq.read_metadata(f"{run_path}/{name}", filesystem=fs).num_rows
    if isinstance(marker.get("n_scored"), int) and rows != marker["n_scored"]:
        raise ValueError(f"parts hold {rows} rows, the marker says {marker['n_scored']}")
    return marker


def committed_runs(out: str, s3_endpoint: str | None = None, *, bad: list[BadRun] | None = None) -> list[dict[str, Any]]:
    """The `_SUCCESS.json` markers of every committed run under `<out>/runs/`, oldest first.

    A run folder without a marker is not committed (killed or still running) and is left out
    silently. A marker that does not parse, or whose listed parts are missing or have no
    readable Parquet footer, is left out with a warning and appended to `bad`: readers never
    raise on a damaged run, and `--incremental` scores its files again."""
    fs, root = resolve_filesystem(join(out, RUNS_DIR), s3_endpoint)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        return []
    markers = []
    for fi in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if fi.type != pafs.FileType.Directory:
            continue
        if fs.get_file_info(fi.path + "/" + SUCCESS_FILE).type != pafs.FileType.File:
            continue  # not committed: killed or still running
        try:
            markers.append(_check_marker(fs, fi.path, fi.base_name))
        except Exception as exc:  # noqa: BLE001 - torn marker, missing or torn part, S3 trouble
            _ignore(bad, fi.base_name, exc)
    return sorted(markers, key=lambda m: (m["finished_at"], m["run_id"]))


def _read_parts(out: str, run_id: str, files: list[str], s3_endpoint: str | None) -> pa.Table:
    fs, run_dir = resolve_filesystem(join(out, RUNS_DIR, run_id), s3_endpoint)
    tables = [pq.read_table(f"{run_dir}/{name}", filesystem=fs, schema=OUTPUT_SCHEMA) for name in files]
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def read_committed(out: str, s3_endpoint: str | None = None, *, bad: list[BadRun] | None = None) -> pa.Table:
    """Every row of every committed run, oldest run first (a path may appear once per run). A run
    whose parts cannot be read is left out whole, like a damaged marker (see `committed_runs`)."""
    tables = []
    for m in committed_runs(out, s3_endpoint, bad=bad):
        try:
            tables.append(_read_parts(out, m["run_id"], m["files"], s3_endpoint))
        except Exception as exc:  # noqa: BLE001 - a part torn past its footer
            _ignore(bad, m["run_id"], exc)
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


def read_results(out: str, s3_endpoint: str | None = None):  # noqa: ANN201 - pandas.DataFrame
    """Committed results as a pandas DataFrame: the latest row per path (by scored_at, then run_id)."""
    df = read_committed(out, s3_endpoint).to_pandas()
    if df.empty:
        return df
    df = df.sort_values(["scored_at", "run_id"], kind="stable")
    return df.drop_duplicates("path", keep="last").sort_values("path").reset_index(drop=True)


def already_scored(out: str, bundle_sha256: str, s3_endpoint: str | None = None, *,
                   bad: list[BadRun] | None = None) -> dict[tuple[str, int, int], str | None]:
    """(path, size, mtime_ns) -> sha256 of the bytes (`etag_or_sha256`, None where the file was
    never read) for files that committed runs scored with this bundle, the latest run's row per
    key; rows of retried error kinds (`RETRY_KINDS`) are left out, so those files are scored again."""
    t = read_committed(out, s3_endpoint, bad=bad)
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


def _same_content(batch: dict[str, np.ndarray], s3_endpoint: str | None) -> dict[str, np.ndarray]:
    """Ray Data task: for each (path, sha256 committed for it), whether the bytes now hash the same
    (False when they cannot be read: the file is scored again and gets its error row)."""
    same = np.zeros(len(batch["path"]), dtype=bool)
    for i, (path, sha) in enumerate(zip(batch["path"], batch["sha256"])):
        try:
            same[i] = hashlib.sha256(read_bytes_of(str(path), s3_endpoint)).hexdigest() == sha
        except Exception:  # noqa: BLE001, S112 - unreadable now: not unchanged
            continue
    return {"path": np.asarray(batch["path"], dtype=object), "same": same}


def unchanged_files(cfg: ScoreConfig, records: list[ImageRecord],
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
        _ensure_ray()
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), -(-len(items) // cfg.read_batch_size))))
        ds = ds.map_batches(_same_content, fn_kwargs={"s3_endpoint": cfg.s3_endpoint},
                            batch_size=cfg.read_batch_size, batch_format="numpy", num_cpus=cfg.read_cpus)
        unchanged |= {str(row["path"]) for row in ds.take_all() if row["same"]}
    return unchanged


def _list_parts(run_dir: str, s3_endpoint: str | None) -> list[str]:
    fs, root = resolve_filesystem(run_dir, s3_endpoint)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(fi.base_name for fi in fs.get_file_info(pafs.FileSelector(root))
                  if fi.type == pafs.FileType.File and fi.base_name.endswith(".parquet"))
