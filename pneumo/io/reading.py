"""The one read path: a file (a `Location`, local or S3) -> model-ready `uint8[S, S]` or an error.

Batch scoring (`pneumo.score.tasks.read_and_preprocess`), training ingest (`pneumo.data.ingest.load_batch`)
and evaluation all call `read_image`, so they read, hash, decode and name errors the same way.
`read_image` never raises for a bad file: it returns a `ReadResult` whose `error` is an
`ImageError(kind, message)`, with `kind` from one vocabulary (`KINDS`):

| kind          | meaning                                                       | retried by `--incremental` |
| ------------- | ------------------------------------------------------------- | -------------------------- |
| `missing`     | no such file (deleted since listing, dangling symlink)        | yes |
| `unreadable`  | I/O failure: permissions, symlink loop, network/S3 error       | yes |
| `empty`       | 0 bytes                                                       | no  |
| `corrupt`     | a JPEG/PNG/DICOM that cannot be decoded (truncated, broken)   | no  |
| `unsupported` | not a JPEG, PNG or DICOM (GIF, TIFF, text...), a folder, a DICOM with no pixels | no |
| `too_large`   | over the pixel budget (`max_pixels`, counting frames and samples), or over `max_bytes` | no  |

The last four are `pneumo.io.preprocess.DecodeError` kinds (serving maps them to 400/400/415/413).
Messages never contain the path (file names carry patient ids); callers that want the path
have it already.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pneumo.io.preprocess import DEFAULT_MAX_PIXELS, DecodeError, InputSpec, load_image
from pneumo.io.storage import Location, NotAFileError

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
    """An I/O failure of `read_file`, with its kind (`missing`, `unreadable`, `unsupported` or `too_large`)."""

    def __init__(self, kind: str, message: str):
        self.kind, self.message = kind, message
        super().__init__(message)


def too_large_message(size: int, max_bytes: int) -> str:
    """The `too_large` error text for a file over the byte cap (no path: file names carry patient ids)."""
    return f"file of {size:,} bytes is over the {max_bytes:,}-byte limit (max_file_bytes); not read"


def read_file(location: Location | str, max_bytes: int | None = None) -> bytes:
    """The bytes of one input file (refused as `too_large` past `max_bytes`, having read at most
    `max_bytes + 1` of them); every failure is a `ReadError` with its kind."""
    try:
        data = Location.of(location).read_bytes(limit=max_bytes)
    except NotAFileError as exc:
        raise ReadError("unsupported", str(exc)) from exc
    except FileNotFoundError as exc:
        raise ReadError("missing", f"not found ({exc.strerror or type(exc).__name__})") from exc
    except OSError as exc:
        text = str(exc)
        if "Path does not exist" in text or "NoSuchKey" in text:
            raise ReadError("missing", f"not found ({type(exc).__name__})") from exc
        reason = exc.strerror or text
        raise ReadError("unreadable", f"cannot read ({type(exc).__name__}: {reason})") from exc
    except Exception as exc:  # noqa: BLE001 - any I/O trouble is this file's error
        raise ReadError("unreadable", f"cannot read ({type(exc).__name__}: {exc})") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ReadError("too_large", f"file over the {max_bytes:,}-byte limit (max_file_bytes); not read whole")
    return data


def read_image(location: Location | str, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = None) -> ReadResult:
    """Read (at most `max_bytes`), hash and preprocess one file. Never raises for a bad file: see `ReadResult`."""
    location = Location.of(location)
    try:
        data = read_file(location, max_bytes)
    except ReadError as exc:
        return ReadResult(error=ImageError(exc.kind, exc.message))
    sha = hashlib.sha256(data).hexdigest()
    try:
        return ReadResult(image=load_image(data, location.uri, spec, max_pixels), sha256=sha)
    except DecodeError as exc:
        return ReadResult(error=ImageError(exc.kind, exc.reason), sha256=sha)
    except Exception as exc:  # noqa: BLE001 - load_image promises DecodeError; stay safe anyway
        return ReadResult(error=ImageError("corrupt", f"{type(exc).__name__}: {exc}"), sha256=sha)
