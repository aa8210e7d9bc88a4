"""The one read path: a location (local path or s3://) -> model-ready `uint8[S, S]` or an error.

Batch scoring (`pneumo.score_tasks.read_and_preprocess`), training ingest (`pneumo.ingest.load_batch`)
and evaluation (`pneumo.evaluation`) all call `read_image`, so they read, hash, decode and name
errors the same way. `read_image` never raises for a bad file: it returns a `ReadResult` whose
`error` is an `ImageError(kind, message)`, with `kind` from one vocabulary (`KINDS`):

| kind          | meaning                                                       | retried by `--incremental` |
| ------------- | ------------------------------------------------------------- | -------------------------- |
| `missing`     | no such file (deleted since listing, dangling symlink)        | yes |
| `unreadable`  | I/O failure: permissions, symlink loop, network/S3 error       | yes |
| `empty`       | 0 bytes                                                       | no  |
| `corrupt`     | a JPEG/PNG/DICOM that cannot be decoded (truncated, broken)   | no  |
| `unsupported` | not a JPEG, PNG or DICOM (GIF, TIFF, text...), a folder, a DICOM with no pixels | no |
| `too_large`   | over the pixel budget (`max_pixels`, counting frames and samples) | no  |

The last four are `pneumo.preprocess.DecodeError` kinds (serving maps them to 400/400/415/413).
Messages never contain the path (file names carry patient ids); callers that want the path
have it already.

Non-UTF-8 local file names: listings (`pneumo.data.list_images`) give such names with every
undecodable byte written as `\\xNN` (`pneumo.data.escape_path`), so they fit the UTF-8 `path`
columns of Ray Data and Parquet. `read_image` reads the escaped form back: if the literal path
does not exist and contains `\\x`, it tries the unescaped one.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from pneumo.data import is_s3, resolve_filesystem, unescape_path
from pneumo.preprocess import DEFAULT_MAX_PIXELS, DecodeError, InputSpec, load_image

KINDS: tuple[str, ...] = ("missing", "unreadable", "empty", "corrupt", "unsupported", "too_large")
IO_KINDS: tuple[str, ...] = ("missing", "unreadable")  # the input may be fine next time


@dataclass(frozen=True)
class ImageError:
    """Why one file is not a model input: `kind` (one of `KINDS`) and a message without the path."""

    kind: str
    message: str


@dataclass(frozen=True)
class ReadResult:
    """`image` (uint8[S, S]) or `error`; `sha256` of the bytes whenever they were read."""

    image: np.ndarray | None = None
    error: ImageError | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ReadError(OSError):
    """An I/O failure of `read_bytes_of`, with its kind (`missing` or `unreadable`)."""

    def __init__(self, kind: str, message: str):
        self.kind, self.message = kind, message
        super().__init__(message)


@lru_cache(maxsize=8)
def _s3(s3_endpoint: str | None) -> Any:
    return resolve_filesystem("s3://bucket", s3_endpoint)[0]


def _read_local(path: str) -> bytes:
    # O_NONBLOCK: a FIFO (or a symlink to one) must not hang the reader; fstat then refuses it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise DecodeError("", "unsupported", f"{what}, not an image file")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def read_bytes_of(path: str, s3_endpoint: str | None = None) -> bytes:
    """Bytes of a local path or s3:// URI. Raises `ReadError` (missing/unreadable) or, for a
    folder or FIFO, `DecodeError(unsupported)`."""
    try:
        if is_s3(path):
            with _s3(s3_endpoint).open_input_stream(path[len("s3://"):]) as f:
                return f.read()
        try:
            return _read_local(path)
        except FileNotFoundError:
            raw = unescape_path(path)
            if raw == path:
                raise
            return _read_local(raw)
    except DecodeError:
        raise
    except FileNotFoundError as exc:
        raise ReadError("missing", f"not found ({exc.strerror or exc})") from exc
    except OSError as exc:
        text = str(exc)
        if "Path does not exist" in text or "NoSuchKey" in text:
            raise ReadError("missing", f"not found ({type(exc).__name__})") from exc
        reason = exc.strerror or text
        raise ReadError("unreadable", f"cannot read ({type(exc).__name__}: {reason})") from exc
    except Exception as exc:  # noqa: BLE001 - any I/O trouble is this file's error
        raise ReadError("unreadable", f"cannot read ({type(exc).__name__}: {exc})") from exc


def read_image(
    path: str,
    spec: InputSpec,
    s3_endpoint: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ReadResult:
    """Read, hash and preprocess one file. Never raises for a bad file: see `ReadResult`."""
    try:
        data = read_bytes_of(path, s3_endpoint)
    except ReadError as exc:
        return ReadResult(error=ImageError(exc.kind, exc.message))
    except DecodeError as exc:
        return ReadResult(error=ImageError(exc.kind, exc.reason))
    sha = hashlib.sha256(data).hexdigest()
    try:
        return ReadResult(image=load_image(data, path, spec, max_pixels), sha256=sha)
    except DecodeError as exc:
        return ReadResult(error=ImageError(exc.kind, exc.reason), sha256=sha)
    except Exception as exc:  # noqa: BLE001 - load_image promises DecodeError; stay safe anyway
        return ReadResult(error=ImageError("corrupt", f"{type(exc).__name__}: {exc}"), sha256=sha)
