"""Data locations (local folders and S3), listing, labels, patient ids and patient-grouped splits.

A location is a local folder or `s3://bucket/prefix`. S3 credentials come from the standard
AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`); an S3-compatible
store is reached with `s3_endpoint="http://host:port"` (or `AWS_ENDPOINT_URL`).

Labelled layout: `<root>/{train,val,test}/<CLASS>/*.{jpeg,jpg,png,dcm}`. When `val/` or `test/`
is missing, `labelled_splits` carves it out of `train/` **by patient**, deterministically.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pyarrow.fs as pafs

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "binary": ("NORMAL", "PNEUMONIA"),
    "three_class": ("NORMAL", "BACTERIA", "VIRUS"),
}

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


class DataError(ValueError):
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


# ---------------------------------------------------------------- filesystems


def is_s3(location: str) -> bool:
    return str(location).startswith("s3://")


def resolve_filesystem(location: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    location = str(location)
    if is_s3(location):
        parsed = urlparse(location)
        if not parsed.netloc:
            raise DataError(f"{location}: an S3 location is s3://bucket/prefix")
        return s3_filesystem(s3_endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def s3_filesystem(s3_endpoint: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem from the standard AWS environment, optionally at a custom endpoint."""
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def to_location(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `resolve_filesystem`: a filesystem path back to a user-facing location."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or s3:// URI."""
    if is_s3(location):
        return "/".join([location.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(location, *parts)


def read_bytes(location: str, s3_endpoint: str | None = None) -> bytes:
    fs, path = resolve_filesystem(location, s3_endpoint)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write a whole file atomically: a reader sees the old file or the new one, never a torn one.

    Local: a temporary name in the same folder, fsync, then `os.replace`. S3: one PUT (atomic per object).
    """
    fs, path = resolve_filesystem(location, s3_endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


# ---------------------------------------------------------------- listing


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


def list_images(
    location: str,
    s3_endpoint: str | None = None,
    extensions: Sequence[str] | None = None,
) -> list[ImageRecord]:
    """Every file under `location` (any nesting), sorted by path, with size and mtime.

    With `extensions=None` (the default, an archive listing for scoring) every regular file or
    symlink is an entry, whatever its name: GIFs, text files and dangling symlinks come back
    too, and reading them gives an error row (`unsupported`, `missing`), so nothing is silently
    left out. Hidden names (starting with `.`) are skipped. With `extensions`, only names ending
    in one of them (case-insensitive). Local names that are not UTF-8 are given `escape_path`d.
    """
    fs, root = resolve_filesystem(location, s3_endpoint)
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None

    def wanted(name: str) -> bool:
        return not name.startswith(".") and (exts is None or name.lower().endswith(exts))

    out = []
    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.isdir(root):
            entries = list(_walk_local(root))
        elif os.path.lexists(root):
            st = os.stat(root) if os.path.exists(root) else None
            entries = [(root, st.st_size if st else -1, st.st_mtime_ns if st else -1)]
        else:
            raise DataError(f"{location}: no such folder or prefix")
        for path, size, mtime in entries:
            if wanted(os.path.basename(path)):
                out.append(ImageRecord(path=escape_path(path), size=size, mtime_ns=mtime))
        return sorted(out, key=lambda r: r.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location}: no such folder or prefix")
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    for fi in infos:
        if fi.type != pafs.FileType.File or not wanted(fi.path.rsplit("/", 1)[-1]):
            continue
        mtime = fi.mtime_ns if fi.mtime_ns is not None else -1
        out.append(ImageRecord(path=to_location(fs, fi.path), size=fi.size or 0, mtime_ns=mtime))
    return sorted(out, key=lambda r: r.path)


def read_manifest(location: str, s3_endpoint: str | None = None) -> list[str]:
    """Paths listed one per line in a text manifest (blank lines and `#` comments skipped)."""
    text = read_bytes(location, s3_endpoint).decode("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# ---------------------------------------------------------------- labels and patients


def patient_id(path: str) -> str:
    """Patient id from a Kermany-style file name; the file stem when the name has no patient part.

    `person1430_bacteria_3695.jpeg` -> `person1430`; `IM-0115-0001.jpeg` -> `IM-0115`;
    `NORMAL2-IM-1427-0001.jpeg` -> `NORMAL2-IM-1427`.
    """
    stem = PurePosixPath(str(path)).stem
    for pattern in (_PERSON, _NORMAL):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def acquisition_group(path: str) -> str:
    """The acquisition series a Kermany-style file name belongs to (for per-group metrics).

    NORMAL files come in two series, `IM-NNNN-NNNN` and `NORMAL2-IM-NNNN-NNNN`; PNEUMONIA files
    are `personN_bacteria_M` or `personN_virus_M`. Anything else is `other`.
    """
    stem = PurePosixPath(str(path)).stem
    m = _PERSON.match(stem)
    if m:
        return m.group(2).lower()
    if _NORMAL.match(stem):
        return "NORMAL2-IM series" if stem.upper().startswith("NORMAL2-") else "IM series"
    return "other"


def label_for(folder_class: str, path: str, label_set: str = "binary") -> str:
    """The label of one file: its class folder, refined by file name for the three-class task."""
    folder_class = folder_class.upper()
    if label_set == "binary":
        if folder_class not in LABEL_SETS["binary"]:
            raise DataError(f"{path}: class folder {folder_class!r} is not one of NORMAL, PNEUMONIA")
        return folder_class
    if label_set == "three_class":
        if folder_class == "NORMAL":
            return "NORMAL"
        m = _PERSON.match(PurePosixPath(str(path)).stem)
        if folder_class in ("BACTERIA", "VIRUS"):
            return folder_class
        if folder_class == "PNEUMONIA" and m:
            return m.group(2).upper()
        raise DataError(f"{path}: cannot tell bacteria from virus (expected personN_bacteria_M or personN_virus_M)")
    raise DataError(f"unknown label set {label_set!r}; valid: {', '.join(LABEL_SETS)}")


def discover(location: str, label_set: str = "binary", s3_endpoint: str | None = None) -> list[ImageRecord]:
    """Every labelled image under `<root>/{train,val,test}/<CLASS>/`, with split, label and patient."""
    if label_set not in LABEL_SETS:
        raise DataError(f"unknown label set {label_set!r}; valid: {', '.join(LABEL_SETS)}")
    root_fs, root = resolve_filesystem(location, s3_endpoint)
    out: list[ImageRecord] = []
    for rec in list_images(location, s3_endpoint, extensions=IMAGE_EXTENSIONS):
        rel_path = rec.path[len("s3://"):] if is_s3(rec.path) else rec.path  # no new filesystem per file
        rel = PurePosixPath(rel_path.replace(os.sep, "/")).relative_to(PurePosixPath(root.replace(os.sep, "/")))
        parts = rel.parts
        if len(parts) < 3 or parts[0] not in SPLITS:
            continue
        out.append(replace(rec, split=parts[0], label=label_for(parts[1], rec.path, label_set),
                           patient_id=patient_id(rec.path)))
    if not out:
        raise DataError(
            f"{location}: no labelled images found; expected <root>/{{train,val,test}}/<CLASS>/*.jpeg"
        )
    return out


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_by_patient(
    records: Iterable[ImageRecord], val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0
) -> list[ImageRecord]:
    """Assign every record to train/val/test so that no patient is in two splits.

    Patients are stratified by their majority label, ordered by a seeded hash of their id, and
    cut at `test_frac` and `val_frac` of each stratum: the same inputs always give the same split.
    """
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"val_frac={val_frac}, test_frac={test_frac}: each in [0, 1) and their sum < 1")
    records = list(records)
    by_patient: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id or patient_id(r.path), []).append(r)
    strata: dict[str, list[str]] = {}
    for pid, recs in by_patient.items():
        labels = [r.label or "" for r in recs]
        # sorted: a tie (e.g. one bacteria and one virus image) must not depend on set order,
        # which changes with PYTHONHASHSEED from process to process
        strata.setdefault(max(sorted(set(labels)), key=labels.count), []).append(pid)
    assignment: dict[str, str] = {}
    for _, pids in sorted(strata.items()):
        pids.sort(key=lambda p: (_unit_hash(f"{seed}:{p}"), p))
        n = len(pids)
        n_test, n_val = round(n * test_frac), round(n * val_frac)
        for i, pid in enumerate(pids):
            assignment[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [replace(r, split=assignment[r.patient_id or patient_id(r.path)]) for r in records]


def labelled_splits(
    location: str,
    label_set: str = "binary",
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
    s3_endpoint: str | None = None,
) -> list[ImageRecord]:
    """Discover a labelled dataset; carve missing val/test splits out of train by patient."""
    records = discover(location, label_set, s3_endpoint)
    present = {r.split for r in records}
    if {"val", "test"} <= present:
        return records
    train = [r for r in records if r.split == "train"]
    kept = [r for r in records if r.split != "train"]
    carved = split_by_patient(
        train,
        val_frac=0.0 if "val" in present else val_frac,
        test_frac=0.0 if "test" in present else test_frac,
        seed=seed,
    )
    return sorted(kept + carved, key=lambda r: r.path)


def fingerprint(records: Iterable[ImageRecord]) -> str:
    """sha256 over (path, size, split, label) of every record: identifies the data a run saw."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.path):
        h.update(f"{r.path}\t{r.size}\t{r.split}\t{r.label}\n".encode())
    return h.hexdigest()


def class_counts(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    """{split: {label: count}}."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        split = out.setdefault(r.split or "unsplit", {})
        split[r.label or "unlabelled"] = split.get(r.label or "unlabelled", 0) + 1
    return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}
