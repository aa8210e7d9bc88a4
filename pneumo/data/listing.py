"""Listing an archive: every entry under a location, with what identifies its content, as rows.

    records = list_images(Location.resolve("s3://xrays/archive"))       # every entry, any nesting, sorted
    records = list_images(loc, extensions=IMAGE_EXTENSIONS)             # image names only
    for table in listing_tables(walk(loc), chunk_rows=50_000): ...      # the same, streamed as Arrow chunks
    paths = read_path_list(Location.resolve("list.txt"))                # a text list of paths

Each entry is (path, size, mtime_ns, ctime_ns, inode, etag) (`LISTING_SCHEMA`): locally from
`os.scandir` + `stat` (ctime cannot be set back by `cp -p`, rsync or a re-export, so with the inode
it tells a same-size replacement), on S3 from boto3's `list_objects_v2` (size and ETag; pyarrow's
listing has no ETag). What is unknown is -1 (None for the ETag).

With `extensions=None` (an archive listing for scoring) every regular file or symlink is an
entry, whatever its name: GIFs, text files and dangling symlinks come back too, and reading them
gives an error row (`unsupported`, `missing`), so nothing is silently left out. Hidden names
(starting with `.`) are skipped. Local names that are not UTF-8 are given `escape_path`d.
`walk` streams (one folder or one S3 page at a time); only `list_images` sorts, and so holds all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from pneumo.config import UserError
from pneumo.io.storage import Location, StorageError, escape_path, s3_client

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()),
                            ("ctime_ns", pa.int64()), ("inode", pa.int64()), ("etag", pa.string())])
Entry = tuple[str, int, int, int, int, "str | None"]  # a LISTING_SCHEMA row


class DataError(UserError, ValueError):
    """A location or dataset layout problem, with what was expected."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file: where it is, what it shows (if labelled), whose it is, what identifies its content."""

    path: str  # full location: local absolute path or s3://bucket/key
    size: int = -1
    mtime_ns: int = -1
    split: str | None = None
    label: str | None = None
    patient_id: str | None = None
    ctime_ns: int = -1
    inode: int = -1
    etag: str | None = None

    def row(self) -> dict[str, object]:
        """The record as a `LISTING_SCHEMA` row (what scoring reads)."""
        return {"path": self.path, "size_bytes": int(self.size), "mtime_ns": int(self.mtime_ns),
                "ctime_ns": int(self.ctime_ns), "inode": int(self.inode), "etag": self.etag}


def _stat_local(path: str) -> tuple[int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode) of what `path` points to; -1s for a dangling symlink or a loop;
    size 0 for a folder (a symlinked one: an entry, never followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, -1, -1
    return (0 if os.path.isdir(path) else st.st_size), st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _walk_local(root: str) -> Iterator[Entry]:
    """Every regular file or symlink under `root`, any nesting, one folder at a time (each sorted).

    `os.scandir` on str paths gives undecodable names surrogate-escaped (never a
    UnicodeDecodeError, unlike pyarrow's `FileInfo.base_name`). Symlinked folders are listed as
    entries, not followed (no loops); a dangling symlink is listed with -1s. Hidden entries
    (`.DS_Store`, `._x` AppleDouble files, `.git/`) are skipped. FIFOs, sockets and devices are
    skipped (reading one could block).
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable subfolder: nothing to list in it
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
            elif entry.is_symlink() or entry.is_file(follow_symlinks=False):
                yield (escape_path(entry.path), *_stat_local(entry.path), None)
        stack.extend(reversed(subfolders))


def _s3_entry(loc: Location, key: str, size: int, modified, etag: str | None) -> Entry:  # noqa: ANN001
    mtime = int(modified.timestamp()) * 10**9 + modified.microsecond * 1000 if modified is not None else -1
    return f"s3://{loc.bucket_key[0]}/{key}", int(size or 0), mtime, -1, -1, (etag or "").strip('"') or None


def _pages(loc: Location, pages: Iterable[dict]) -> Iterator[dict]:
    """boto3's listing pages; an endpoint that does not answer, no credentials or no bucket is a
    StorageError that says so (one line for the user), not botocore's traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield from pages
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        if code in ("NoSuchKey", "404"):
            return
        raise StorageError(f"{loc}: S3 refused the listing ({code}: {exc.response.get('Error', {}).get('Message', '')}); "
                           "check the bucket name and the AWS credentials") from exc
    except BotoCoreError as exc:
        where = loc.endpoint or "the AWS default endpoint"
        raise StorageError(f"{loc}: cannot list it on {where} ({exc}); check --s3-endpoint and the AWS "
                           "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from exc


def _walk_s3(loc: Location) -> Iterator[Entry]:
    """Every object under the prefix (or the one object `loc` names), one listing page at a time."""
    client = s3_client(loc.endpoint)
    bucket, key = loc.bucket_key
    prefix = key.rstrip("/") + "/" if key else ""
    listed = False
    for page in _pages(loc, client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)):
        for obj in page.get("Contents", []):
            listed = True
            rel = obj["Key"][len(prefix):]
            if obj["Key"].endswith("/") or any(part.startswith(".") for part in rel.split("/")):
                continue  # a folder marker or a hidden name
            yield _s3_entry(loc, obj["Key"], obj.get("Size"), obj.get("LastModified"), obj.get("ETag"))
    if not listed and key:  # not a prefix: one object, or nothing
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - 404 (or no access): no such object
            raise DataError(f"{loc}: no such folder or prefix") from exc
        yield _s3_entry(loc, key, head.get("ContentLength"), head.get("LastModified"), head.get("ETag"))


def walk(location: Location | str, extensions: Sequence[str] | None = None) -> Iterator[Entry]:
    """Every entry under `location` (any nesting) as a `LISTING_SCHEMA` tuple, streamed (see the module doc)."""
    loc = Location.of(location)
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None

    def wanted(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return not name.startswith(".") and (exts is None or name.lower().endswith(exts))

    if loc.is_s3:
        entries: Iterable[Entry] = _walk_s3(loc)
    elif os.path.isdir(loc.path):
        entries = _walk_local(loc.path)
    elif os.path.lexists(loc.path):
        entries = [(escape_path(loc.path), *_stat_local(loc.path), None)]
    else:
        raise DataError(f"{loc}: no such folder or prefix")
    return (e for e in entries if wanted(e[0]))


def list_images(location: Location | str, extensions: Sequence[str] | None = None) -> list[ImageRecord]:
    """Every file under `location` (any nesting), sorted by path (see the module doc)."""
    return sorted((ImageRecord(path, size, mtime, ctime_ns=ctime, inode=ino, etag=etag)
                   for path, size, mtime, ctime, ino, etag in walk(location, extensions)), key=lambda r: r.path)


def stat_path(store: Location, path: str) -> Entry:
    """One listed path (a manifest line) as an entry: its size and identity now, or -1s when it is
    not a file (it is then scored as a `missing` or `unsupported` row)."""
    try:
        loc = store.at(path)
        if not loc.is_s3:
            return (escape_path(loc.path), *_stat_local(loc.path), None)
        bucket, key = loc.bucket_key
        head = s3_client(loc.endpoint).head_object(Bucket=bucket, Key=key)
        return _s3_entry(loc, key, head.get("ContentLength"), head.get("LastModified"), head.get("ETag"))
    except Exception:  # noqa: BLE001 - a bad list line is a row, not a crash
        return (path if "://" in path else os.path.abspath(path), -1, -1, -1, -1, None)


def read_path_list(location: Location | str) -> list[str]:
    """Paths listed one per line in a text file (blank lines and `#` comments skipped)."""
    text = Location.of(location).read_bytes().decode("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def walk_path_list(location: Location | str, store: Location | None = None) -> Iterator[Entry]:
    """The entries a path list names, each once (the first time it is listed), looked up on `store`."""
    store = store or Location.of(location)
    seen: set[str] = set()  # one row per distinct path: O(list), in the listing task
    for path in read_path_list(location):
        if path not in seen:
            seen.add(path)
            yield stat_path(store, path)


def listing_tables(entries: Iterable[Entry], chunk_rows: int = 50_000) -> Iterator[pa.Table]:
    """`entries` as `LISTING_SCHEMA` Arrow tables of at most `chunk_rows` rows (at least one, maybe empty)."""
    cols: list[list] = [[] for _ in LISTING_SCHEMA]
    sent = False
    for entry in entries:
        for col, value in zip(cols, entry):
            col.append(value)
        if len(cols[0]) >= chunk_rows:
            yield pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, LISTING_SCHEMA)],
                                       schema=LISTING_SCHEMA)
            cols, sent = [[] for _ in LISTING_SCHEMA], True
    if cols[0] or not sent:
        yield pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, LISTING_SCHEMA)],
                                   schema=LISTING_SCHEMA)
