"""A scoring run's input, listed into Ray Data in chunks: the driver never holds the listing.

    store, listing = listing_dataset(cfg)   # lazy Dataset of LISTING_SCHEMA rows

One Ray Data read task walks the folder, the S3 prefix (boto3 `list_objects_v2`, one page at a
time) or the `--manifest` list (`pneumo.data.listing`), and yields Arrow blocks of `CHUNK_ROWS`
entries as it goes; the blocks stream into the rest of the run (the incremental join, the read
tasks). A local folder or list is walked on the driver's node, where the path was given.
"""

from __future__ import annotations

import os
from typing import Any

from pneumo.config import ConfigError
from pneumo.data.listing import LISTING_SCHEMA, DataError, listing_tables, walk, walk_path_list
from pneumo.io.storage import Location
from pneumo.score.config import ScoreConfig

CHUNK_ROWS = 50_000


def check_input(cfg: ScoreConfig) -> Location:
    """The store the paths are read from; a folder, prefix or list that is not there is a config
    error (before Ray starts)."""
    if cfg.data is None:
        store = cfg.manifest_location
        if not store.exists():
            raise ConfigError(f"manifest: {store} does not exist")
        return store
    store = cfg.data_location
    try:
        present = os.path.lexists(store.path) if not store.is_s3 else any(True for _ in _first(store))
    except DataError:
        present = False
    if not present:
        raise ConfigError(f"data: {store}: no such folder or prefix")
    return store


def _first(store: Location) -> Any:
    for entry in walk(store):
        yield entry
        return


def _read_fn(data: Location | None, manifest: Location | None, chunk_rows: int) -> Any:
    def read() -> Any:
        entries = walk(data) if data is not None else walk_path_list(manifest)
        yield from listing_tables(entries, chunk_rows)
    return read


def listing_dataset(cfg: ScoreConfig, chunk_rows: int = CHUNK_ROWS) -> tuple[Location, Any]:
    """(the store the paths are read from, a lazy Dataset of the input's `LISTING_SCHEMA` rows)."""
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    data, manifest = cfg.data_location, cfg.manifest_location
    store = data or manifest
    read = _read_fn(data, manifest, chunk_rows)

    local = not store.is_s3

    class Listing(Datasource):
        @property
        def supports_distributed_reads(self) -> bool:  # False: Ray reads on the driver's node
            return not local

        def estimate_inmemory_data_size(self) -> None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Any = None, data_context: Any = None) -> list:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, meta, schema=LISTING_SCHEMA)]

    return store, ray.data.read_datasource(Listing(), override_num_blocks=1)
