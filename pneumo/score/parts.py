"""A run's data files before its commit: Ray Data write tasks put them at the table's root.

    sink = PartSink(out, run_id, OUTPUT_SCHEMA); ds.write_datasink(sink); sink.parts   # [{path, size, rows, counts}]
    add_counts(sink.parts)                                      # {status: {...}, label: {...}, error_kind: {...}}

Each write task writes its rows as one Parquet file `part-<run_id>-<tag><task>-<uuid>.parquet` (at
least `MIN_ROWS_PER_FILE` rows gathered first: few, large files) and reports its path, size, rows,
counts by status, label and error kind, and the digest of its paths (`path_digest`), so the driver
learns a run's counts and checks one row per file without reading the files back. Nothing is
visible to readers until `pneumo.score.table.commit` names the files.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pneumo.io.storage import Location
from pneumo.score.table import part_prefix
from pneumo.score.tasks import OUTPUT_SCHEMA

MIN_ROWS_PER_FILE = 100_000
COUNTED = ("status", "label", "error_kind")


def path_digest(paths: pa.Array | pa.ChunkedArray) -> list[int]:
    """[rows, four sums of 31-bit pieces of each path's blake2b]: a multiset hash of the paths, to add up."""
    out = [len(paths), 0, 0, 0, 0]
    for p in paths.to_pylist():
        h = int.from_bytes(hashlib.blake2b(p.encode("utf-8", "surrogatepass"), digest_size=16).digest(), "little")
        for i in range(4):
            out[i + 1] += (h >> (32 * i)) & 0x7FFFFFFF
    return out


def add_digests(digests: list[list[int]]) -> list[int]:
    return [sum(d[i] for d in digests) for i in range(5)]


def _counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """{column: {value: rows}} for status, label and error_kind (nulls left out)."""
    out: dict[str, dict[str, int]] = {}
    for name in COUNTED:
        column = table.column(name).drop_null()
        out[name] = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(column).to_pylist()} if len(column) else {}
    return out


def add_counts(parts: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """A run's counts by status, label and error kind, summed over its files."""
    total: dict[str, dict[str, int]] = {name: {} for name in COUNTED}
    for p in parts:
        for name, counts in p["counts"].items():
            for value, k in counts.items():
                total[name][value] = total[name].get(value, 0) + k
    return {name: dict(sorted(c.items())) for name, c in total.items()}


class PartSink(Datasink):
    """Ray Data datasink writing a run's rows as Parquet files at the table's root, uncommitted."""

    def __init__(self, out: Location, run_id: str, schema: pa.Schema, tag: str = ""):
        self.out, self.run_id, self.schema, self.tag = out, run_id, schema, tag
        self.parts: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return MIN_ROWS_PER_FILE

    def write(self, blocks: Any, ctx: Any) -> list[dict[str, Any]]:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables([t.select(self.schema.names).cast(self.schema) for t in tables])
        name = f"{part_prefix(self.run_id)}{self.tag}{ctx.task_idx:05d}-{uuid.uuid4().hex[:12]}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        self.out.join(name).write_bytes(data)  # atomic: a torn file never has the final name
        return [{"path": name, "size": len(data), "rows": table.num_rows, "counts": _counts(table),
                 "digest": path_digest(table.column("path"))}]

    def on_write_complete(self, write_result: Any) -> None:
        self.parts = [p for ret in write_result.write_returns for p in (ret or [])]


SAMPLE_ROWS = 100_000  # ok rows the driver takes for drift and EM: all of them below this


def ok_sample(out: Location, parts: list[dict[str, Any]], columns: list[str], n_ok: int,
              limit: int = SAMPLE_ROWS, seed: int = 0) -> pa.Table:
    """A uniform sample (all of them when `n_ok <= limit`) of the ok rows in a run's files, with `columns`.
    All of them: read here with pyarrow's threads (a Ray Data job would add about 2 s to every run);
    a sample: Ray Data's tasks read and sample the files, so the driver only receives the sample."""
    import ray
    from ray.data.expressions import col

    empty = OUTPUT_SCHEMA.empty_table().select(["status", *columns])
    if not parts or n_ok == 0:
        return empty
    paths = [out.join(p["path"]).path for p in parts]
    if n_ok <= limit:
        import pyarrow.dataset as pads

        table = pads.dataset(paths, format="parquet", filesystem=out.fs).to_table(
            columns=["status", *columns], filter=pc.field("status") == "ok")
        return table if table.num_rows else empty
    ds = ray.data.read_parquet(paths, filesystem=out.fs, columns=["status", *columns]).filter(expr=col("status") == "ok")
    ds = ds.random_sample(limit / n_ok, seed=seed)
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else empty
