"""Listing an archive: every entry under a location, with size and mtime, as `ImageRecord`s.

    records = list_images(Location.resolve("s3://xrays/archive"))       # every entry, any nesting
    records = list_images(loc, extensions=IMAGE_EXTENSIONS)             # image names only
    paths = read_path_list(Location.resolve("list.txt"))                # a text list of paths

With `extensions=None` (an archive listing for scoring) every regular file or symlink is an
entry, whatever its name: GIFs, text files and dangling symlinks come back too, and reading them
gives an error row (`unsupported`, `missing`), so nothing is silently left out. Hidden names
(starting with `.`) are skipped. Local names that are not UTF-8 are given `escape_path`d.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs

from pneumo.config import UserError
from pneumo.io.storage import Location, escape_path

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")


class DataError(UserError, ValueError):
    """A location or dataset layout problem, with what was expected."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file: where it is, what it shows (if labelled) and whose it is."""

    path: str  # full location: local absolute path or s3://bucket/key
    size: int = -1
    mtime_ns: int = -1
    split: str | None = None
    label: str | None = None
    patient_id: str | None = None


def _walk_local(root: str) -> Iterable[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every regular file or symlink under `root`, any nesting.

    `os.scandir` on str paths gives undecodable names surrogate-escaped (never a
    UnicodeDecodeError, unlike pyarrow's `FileInfo.base_name`). Symlinked folders are listed as
    entries, not followed (no loops); a dangling symlink is listed with size and mtime -1.
    Hidden entries (`.DS_Store`, `._x` AppleDouble files, `.git/`) are skipped. FIFOs, sockets
    and devices are skipped (reading one could block).
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # an unreadable subfolder: nothing to list in it
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
                continue
            if not (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                continue
            try:
                st = entry.stat(follow_symlinks=True)
                size, mtime = (st.st_size, st.st_mtime_ns) if not os.path.isdir(entry.path) else (0, st.st_mtime_ns)
            except OSError:  # dangling symlink or loop: still an entry (a `missing`/`unreadable` row)
                size, mtime = -1, -1
            yield entry.path, size, mtime


def list_images(location: Location | str, extensions: Sequence[str] | None = None) -> list[ImageRecord]:
    """Every file under `location` (any nesting), sorted by path, with size and mtime (see the module doc)."""
    loc = Location.of(location)
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None

    def wanted(name: str) -> bool:
        return not name.startswith(".") and (exts is None or name.lower().endswith(exts))

    out = []
    if not loc.is_s3:
        root = loc.path
        if os.path.isdir(root):
            entries = list(_walk_local(root))
        elif os.path.lexists(root):
            st = os.stat(root) if os.path.exists(root) else None
            entries = [(root, st.st_size if st else -1, st.st_mtime_ns if st else -1)]
        else:
            raise DataError(f"{loc}: no such folder or prefix")
        for path, size, mtime in entries:
            if wanted(os.path.basename(path)):
                out.append(ImageRecord(path=escape_path(path), size=size, mtime_ns=mtime))
        return sorted(out, key=lambda r: r.path)
    info = loc.info()
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{loc}: no such folder or prefix")
    infos = [info] if info.type == pafs.FileType.File else loc.fs.get_file_info(
        pafs.FileSelector(loc.path, recursive=True))
    for fi in infos:
        if fi.type != pafs.FileType.File or not wanted(fi.path.rsplit("/", 1)[-1]):
            continue
        mtime = fi.mtime_ns if fi.mtime_ns is not None else -1
        out.append(ImageRecord(path=loc.uri_of(fi.path), size=fi.size or 0, mtime_ns=mtime))
    return sorted(out, key=lambda r: r.path)


def read_path_list(location: Location | str) -> list[str]:
    """Paths listed one per line in a text file (blank lines and `#` comments skipped)."""
    text = Location.of(location).read_bytes().decode("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
