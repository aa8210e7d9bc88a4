"""File names carry patient ids (`person1234_bacteria_5.jpeg`): logs, manifests, summaries and reports
name files by a salted hash instead, unless the operator opts in with `PNEUMO_LOG_PATHS=1`.

    redact("/data/train/PNEUMONIA/person999_bacteria_1.jpeg")  ->  "file#3fa2c19b"

The salt is random per process (one run: the same file always gets the same name within its logs
and manifest, and names cannot be matched across runs or guessed from a list of patient ids). Set
`PNEUMO_REDACT_SALT` (e.g. from a Kubernetes Secret) for names that are stable across runs; whoever
knows that salt can check a suspected path with `redact(path)`. Scoring's table `path` column and
evaluate's predictions.csv are the user's own data and keep full paths.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

LOG_PATHS_ENV = "PNEUMO_LOG_PATHS"
SALT_ENV = "PNEUMO_REDACT_SALT"
_RUN_SALT = secrets.token_hex(16)
_REDACTED = re.compile(r"^file#[0-9a-f]{8}$")


def log_paths() -> bool:
    """True when the operator opted in to full paths (`PNEUMO_LOG_PATHS=1`)."""
    return os.environ.get(LOG_PATHS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def redact(path: Any) -> str:
    """`file#<8 hex of sha256(salt + path)>`, or the path itself when opted in (idempotent)."""
    text = str(path)
    if log_paths() or _REDACTED.match(text):
        return text
    salt = os.environ.get(SALT_ENV) or _RUN_SALT
    return "file#" + hashlib.sha256(f"{salt}\0{text}".encode()).hexdigest()[:8]


def scrub(message: Any, path: Any) -> str:
    """`message` with `path` (and its file name) replaced by `redact(path)`; e.g. OS error texts."""
    text, full = str(message), str(path)
    if log_paths() or not full:
        return text
    name = full.rstrip("/").rsplit("/", 1)[-1]
    for part in (full, name):
        if part:
            text = text.replace(part, redact(full))
    return text


def redact_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of error rows ({path, ...}) with `path` redacted and the path scrubbed from every text field."""
    out = []
    for e in errors:
        row = dict(e)
        if "path" in row:
            path = row["path"]
            row = {k: scrub(v, path) if isinstance(v, str) and k != "path" else v for k, v in row.items()}
            row["path"] = redact(path)
        out.append(row)
    return out
