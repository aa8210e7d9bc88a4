"""Where data lives: a `Location` is a path on a filesystem, local or S3, with one way to read
and write its bytes.

    loc = Location.resolve("s3://xrays/archive", s3_endpoint="http://127.0.0.1:8333")  # once per verb
    loc.join("_pneumo", "runs", run_id, "drift.json").write_bytes(b"{...}")          # atomic
    loc.read_bytes(), loc.exists(), loc.is_dir(), str(loc)   # "s3://xrays/archive"
    loc.at("s3://xrays/archive/a/b.jpeg")                    # another path on the same store
    loc.storage_options()                                    # the same store for deltalake / polars
    s3_client(loc.endpoint)                                  # boto3, for what pyarrow lacks (ETags)

A Location is two strings, the URI and the S3 endpoint (None: `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL` or AWS itself), so it pickles into Ray tasks and actors as it is. Its pyarrow
filesystem comes from one cache per process (`filesystem`), built once per endpoint in the driver
and in every worker. S3 credentials come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).

Local file names that are not UTF-8 are written `\\xNN` per undecodable byte (`escape_path`), so
they fit UTF-8 columns; reading such a path tries the raw bytes when the escaped name does not exist.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pneumo.config import UserError

S3_SCHEME = "s3://"


class StorageError(UserError, ValueError):
    """A location that cannot be a location (e.g. `s3://` without a bucket)."""


class NotAFileError(OSError):
    """The path is a folder, a FIFO, a socket or a device: nothing to read as a file's bytes."""


def is_s3(uri: Any) -> bool:
    return str(uri).startswith(S3_SCHEME)


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str, key: str | None, secret: str | None,
        token: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": region, "connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**kwargs)


_LOCAL = pafs.LocalFileSystem()


@lru_cache(maxsize=16)
def _boto3(endpoint: str | None, region: str, key: str | None, secret: str | None, token: str | None) -> Any:
    import boto3  # start-up time: only listings and manifests on S3 need it

    return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key,
                        aws_secret_access_key=secret, aws_session_token=token)


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client(endpoint: str | None = None) -> Any:
    """The process's cached boto3 S3 client for `endpoint` (else the AWS environment's): pyarrow's
    listing has no ETags, boto3's `list_objects_v2` and `head_object` have them."""
    env = os.environ.get
    endpoint = endpoint or _env_endpoint()
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return _boto3(endpoint, _region(), env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"),
                  env("AWS_SESSION_TOKEN"))


def filesystem(uri: str, endpoint: str | None = None) -> pafs.FileSystem:
    """The process's cached filesystem for `uri`: local, or S3 at `endpoint` (else the AWS environment's)."""
    if not is_s3(uri):
        return _LOCAL
    env = os.environ.get
    return _s3(endpoint or _env_endpoint(), _region(),
               env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"), env("AWS_SESSION_TOKEN"))


@dataclass(frozen=True)
class Location:
    """A local absolute path or an `s3://bucket/key` URI, and the S3 endpoint that reaches it.
    `source`: the name a user gave it when that is not `uri` (a registry URI, `models:/NAME/VERSION`,
    from `pneumo.bundle.registry.resolve_bundle`); not part of equality."""

    uri: str
    endpoint: str | None = None
    source: str | None = field(default=None, compare=False)

    # ---- construction

    @classmethod
    def resolve(cls, text: str | os.PathLike | Location, s3_endpoint: str | None = None) -> Location:
        """A Location from what a user typed: local paths made absolute, `s3://` checked for a bucket."""
        if isinstance(text, Location):
            return text if s3_endpoint is None else cls(text.uri, s3_endpoint, text.source)
        raw = os.fspath(text)
        if is_s3(raw):
            if not urlparse(raw).netloc:
                raise StorageError(f"{raw}: an S3 location is s3://bucket/prefix")
            return cls(raw.rstrip("/") if raw.count("/") > 2 else raw, s3_endpoint)
        return cls(os.path.abspath(os.path.expanduser(raw)), s3_endpoint)

    @classmethod
    def of(cls, value: str | os.PathLike | Location) -> Location:
        """`value` if it is a Location, else `resolve(value)` with the environment's S3 endpoint."""
        return value if isinstance(value, Location) else cls.resolve(value)

    def at(self, uri: str) -> Location:
        """Another path (e.g. a listed file) on the same store."""
        return Location(uri if is_s3(uri) else os.path.abspath(uri), self.endpoint)

    def join(self, *parts: str) -> Location:
        if self.is_s3:
            return Location("/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts if p]]), self.endpoint)
        return Location(os.path.join(self.uri, *parts), self.endpoint)

    # ---- what it is

    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.uri, self.endpoint)

    @property
    def path(self) -> str:
        """The path inside `fs`: `bucket/key` on S3, the absolute path locally."""
        return self.uri[len(S3_SCHEME):].rstrip("/") if self.is_s3 else self.uri

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0], self.endpoint)

    @property
    def bucket_key(self) -> tuple[str, str]:
        """(bucket, key) of an `s3://` location (key "" for a bucket)."""
        bucket, _, key = self.path.partition("/")
        return bucket, key

    def storage_options(self) -> dict[str, str] | None:
        """This store as deltalake / polars / object_store `storage_options` (None locally): the
        endpoint, plain HTTP allowed for an `http://` one, the region and the AWS environment's keys."""
        if not self.is_s3:
            return None
        env = os.environ.get
        opts = {"AWS_REGION": _region()}
        endpoint = self.endpoint or _env_endpoint()
        if endpoint:
            endpoint = endpoint if "://" in endpoint else f"http://{endpoint}"
            opts["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            if env(name):
                opts[name] = env(name)
        return opts

    def uri_of(self, fs_path: str) -> str:
        """A path inside `fs` (as pyarrow lists it) back to a URI of this store."""
        return f"{S3_SCHEME}{fs_path}" if self.is_s3 else fs_path

    def __str__(self) -> str:
        return self.uri

    # ---- reading and writing

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if not self.is_s3:
            return os.path.lexists(self.path)
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def files(self, suffix: str = "") -> list[str]:
        """Names of the regular files directly in this folder ending in `suffix` ([] when no folder)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(fi.base_name for fi in infos if fi.type == pafs.FileType.File and fi.base_name.endswith(suffix))

    def folders(self) -> list[str]:
        """Names of the folders directly in this folder ([] when no folder)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(fi.base_name for fi in infos if fi.type == pafs.FileType.Directory)

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The file's bytes (at most `limit + 1` of them when `limit` is given, so a caller can tell
        "over the limit" without reading a huge file whole).

        Local reads never block on a FIFO and refuse what is not a regular file (`NotAFileError`);
        an escaped non-UTF-8 name that does not exist is retried as its raw bytes.
        """
        if self.is_s3:
            with self.fs.open_input_stream(self.path) as f:
                return f.read() if limit is None else f.read(limit + 1)
        try:
            return _read_local(self.path, limit)
        except FileNotFoundError:
            raw = unescape_path(self.path)
            if raw == self.path:
                raise
            return _read_local(raw, limit)

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically: a reader sees the old file or the new one, never a torn one.

        Local: a temporary name in the same folder, fsync, then `os.replace`. S3: one PUT (atomic per object).
        """
        if self.is_s3:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self) -> None:
        """Remove the file (a missing one is fine)."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass


def _read_local(path: str, limit: int | None) -> bytes:
    # O_NONBLOCK: a FIFO (or a symlink to one) must not hang the reader; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise NotAFileError(f"{what}, not an image file")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read() if limit is None else f.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def put_tree(local: Any, dest: Location) -> list[Location]:
    """Copy every file under the local folder `local` to the same relative paths under `dest`
    (e.g. a report written locally, then published to S3); returns where they went."""
    from pathlib import Path

    out = []
    root = Path(local)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            target = dest.join(*path.relative_to(root).parts)
            target.write_bytes(path.read_bytes())
            out.append(target)
    return out


# ---------------------------------------------------------------- non-UTF-8 local names


def escape_path(path: str) -> str:
    """A local path as valid UTF-8 text: undecodable bytes (surrogate-escaped by `os.fsdecode`)
    become `\\xNN`. Identity for every UTF-8 name. `unescape_path` undoes it for reading."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x([89a-fA-F][0-9a-fA-F])")


def unescape_path(path: str) -> str:
    """Inverse of `escape_path`: `\\xNN` (NN >= 0x80) back to the raw byte, as `os.fsdecode` gives it."""
    if "\\x" not in path:
        return path
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), path)
