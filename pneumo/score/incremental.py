"""`--incremental` and the one-row check, as Ray Data operations (the driver holds counts, not rows).

    plan = plan_run(listing, out, bundle_sha256, cfg, store)   # the files to score, and how many were skipped
    check_one_row_per_file(plan.to_score, parts, run_id)       # before the commit

The decision. A committed row describes a file as it is now when its *fingerprint* equals the
listing's: locally (size, mtime_ns, ctime_ns, inode), on S3 (size, ETag) (`fingerprints`). ctime
cannot be set back by `cp -p`, rsync or a re-export, so a same-size replacement is seen without
reading anything. For each path the table's latest row with this bundle (a hash-shuffle
aggregation: `groupby("path")` with `Max` over a sortable state string) is left-outer-joined to the
listing (`Dataset.join`); a file is skipped when that row's fingerprint is the listing's and it is
not a retried error (`RETRY_KINDS`, or an overlay that failed). `--verify-content` reads and
sha256-hashes the skipped files too and scores those whose bytes differ (today's check, for stores
whose listing says little).

The check. The rows in the run's files must be exactly the files to score: the same count and the
same sums of four 31-bit pieces of each path's blake2b (a multiset hash, summed per block by Ray
Data tasks and per file by the write tasks; no shuffle), so a lost, duplicated or foreign row
fails the run before it commits (odds of a miss about 2^-124).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pneumo.data.listing import LISTING_SCHEMA
from pneumo.io.reading import read_file
from pneumo.io.storage import Location
from pneumo.score import table as T
from pneumo.score.config import Pipeline
from pneumo.score.tasks import RETRY_KINDS

SEP = "\x1f"  # between the fields of a history state (below every printable character, so sorting holds)
HISTORY = ["path", "size_bytes", "mtime_ns", "ctime_ns", "inode", "etag", "etag_or_sha256", "bundle_sha256",
           "error_kind", "explain_error", "scored_at", "run_id"]
MAX_READ_BLOCKS = 2048


def fingerprints(t: pa.Table) -> pa.Array:
    """What identifies a file's content in a listing: `s3:<size>:<etag>` where there is an ETag,
    else `fs:<size>:<mtime_ns>:<ctime_ns>:<inode>` (the same for listing and table rows)."""
    def text(name: str) -> pa.Array:
        return pc.cast(pc.fill_null(t.column(name), -1), pa.string())

    local = pc.binary_join_element_wise("fs", text("size_bytes"), text("mtime_ns"), text("ctime_ns"), text("inode"), ":")
    etag = pc.cast(t.column("etag"), pa.string())  # joins hand back large_string
    s3 = pc.binary_join_element_wise("s3", text("size_bytes"), etag, ":")
    return pc.if_else(pc.is_null(etag), local, s3)


def _history_state(t: pa.Table, bundle_sha256: str) -> pa.Table:
    """Ray Data task: this bundle's rows as (path, state); `state` sorts by (scored_at, run_id) and
    carries the retry flag, the fingerprint and the sha256 of the bytes."""
    t = t.filter(pc.equal(t.column("bundle_sha256"), bundle_sha256))
    retry = pc.or_(pc.fill_null(pc.is_in(t.column("error_kind"), pa.array(list(RETRY_KINDS))), False),
                   pc.is_valid(t.column("explain_error")))
    when = pc.utf8_lpad(pc.cast(pc.cast(t.column("scored_at"), pa.int64()), pa.string()), 20, "0")
    state = pc.binary_join_element_wise(when, t.column("run_id"), pc.if_else(retry, "1", "0"), fingerprints(t),
                                        pc.fill_null(t.column("etag_or_sha256"), ""), SEP)
    return pa.table({"path": t.column("path"), "state": state})


def latest_states(out: Location, bundle_sha256: str, partitions: int) -> Any:
    """(path, state of the latest committed row with this bundle) for every path the table has scored."""
    from ray.data.aggregate import Max

    history = T.history_dataset(out, HISTORY).map_batches(
        _history_state, fn_kwargs={"bundle_sha256": bundle_sha256}, batch_format="pyarrow")
    return history.groupby("path", num_partitions=partitions).aggregate(Max("state", alias_name="state"))


def _mark(t: pa.Table) -> pa.Table:
    """Ray Data task: the listing rows with `skip` (the latest row fits) and `committed_sha256`."""
    parts = pc.split_pattern(pc.fill_null(pc.cast(t.column("state"), pa.string()), SEP * 4), SEP)  # 5 fields
    retry, fingerprint, sha = (pc.list_element(parts, i) for i in (2, 3, 4))
    skip = pc.fill_null(pc.and_(pc.equal(retry, "0"), pc.equal(fingerprint, fingerprints(t))), False)
    committed = pc.if_else(pc.equal(sha, ""), pa.scalar(None, pa.string()), sha)
    listing = t.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA)
    return listing.append_column("skip", skip).append_column("committed_sha256", pc.cast(committed, pa.string()))


def changed_files(batch: pa.Table, store: Location) -> pa.Table:
    """Ray Data task (`--verify-content`): the listing rows whose bytes no longer hash to `committed_sha256`."""
    keep = np.zeros(batch.num_rows, dtype=bool)
    for i, (path, sha) in enumerate(zip(batch.column("path").to_pylist(), batch.column("committed_sha256").to_pylist())):
        try:
            keep[i] = sha is not None and hashlib.sha256(read_file(store.at(path))).hexdigest() != sha
        except Exception:  # noqa: BLE001 - unreadable now: scored again, for its error row
            keep[i] = True
    return batch.filter(pa.array(keep)).select(LISTING_SCHEMA.names)


@dataclass
class Plan:
    """What a run will score: `to_score` (a materialized Dataset of `LISTING_SCHEMA` rows) and the counts."""

    to_score: Any
    n_listed: int
    n_skipped: int
    n_verified: int = 0  # files read and hashed by --verify-content


def plan_run(listing: Any, out: Location, bundle_sha256: str, cfg: Pipeline, store: Location,
             incremental: bool, verify_content: bool = False) -> Plan:
    """The files of `listing` to score (all of them unless `incremental`; see the module doc)."""
    from ray.data.expressions import col

    if not incremental or not T.exists(out) or T.n_rows(out) == 0:
        to_score, n = read_blocks(listing, cfg.read_batch_size)
        return Plan(to_score, n, 0)
    partitions = max(2, min(200, T.n_rows(out) // 250_000 + 1))
    marked = listing.join(latest_states(out, bundle_sha256, partitions), "left_outer", partitions,
                          on=("path",)).map_batches(_mark, batch_format="pyarrow").materialize()
    n_listed = marked.count()
    to_score = marked.filter(expr=~col("skip")).select_columns(LISTING_SCHEMA.names)
    skipped = marked.filter(expr=col("skip"))
    n_verified = 0
    if verify_content:
        n_verified = skipped.count()
        changed = skipped.map_batches(changed_files, fn_kwargs={"store": store}, batch_size=cfg.read_batch_size,
                                      batch_format="pyarrow", num_cpus=cfg.read_cpus)
        to_score = to_score.union(changed)
    to_score, n = read_blocks(to_score, cfg.read_batch_size)
    return Plan(to_score, n_listed, n_listed - n, n_verified)


def read_blocks(ds: Any, read_batch_size: int) -> tuple[Any, int]:
    """`ds` materialized in blocks that are the read tasks' units: `read_batch_size` files each, or
    more when there are more than `MAX_READ_BLOCKS` of those (the driver holds a little per block).
    Done here, before the model actors hold the CPUs, because splitting blocks takes a task of its own."""
    ds = ds.materialize()
    n = ds.count()
    rows = max(read_batch_size, -(-n // MAX_READ_BLOCKS))
    return ds.repartition(target_num_rows_per_block=rows).materialize(), n


def _block_digest(t: pa.Table) -> pa.Table:
    from pneumo.score.parts import path_digest

    return pa.table({"digest": [path_digest(t.column("path"))]})


def check_one_row_per_file(to_score: Any, parts: list[dict[str, Any]], run_id: str) -> None:
    """Exactly one row per input file in the run's files, or raise (nothing is committed then): the
    files' digests (`PartSink` reports them) must add up to the digest of the files to score (one
    Ray Data pass over them, a row per block back to the driver)."""
    from pneumo.score.parts import add_digests

    blocks = to_score.select_columns(["path"]).map_batches(_block_digest, batch_size=None, batch_format="pyarrow")
    expected = add_digests([row["digest"] for row in blocks.take_all()]) if to_score.count() else [0] * 5
    written = add_digests([p["digest"] for p in parts])
    if written != expected:
        raise RuntimeError(f"run {run_id}: {written[0]} rows for {expected[0]} files, or not one row per file; "
                           "not committing")
