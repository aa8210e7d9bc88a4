"""Quiet by default: one progress line per stage when nobody watches a terminal.

    logs.interactive()                # a terminal (or PNEUMO_VERBOSE=1): Ray's own progress output stays
    logs.worker_line(text)            # one line from inside a Ray Train worker, printed once

`pneumo.ray_env.quiet_ray` turns Ray Data's progress reports off in non-interactive runs.
"""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    return sys.stdout.isatty() or os.environ.get("PNEUMO_VERBOSE", "") not in ("", "0")


def worker_line(text: str) -> None:
    """One line from inside a Ray Train worker, printed once.

    Ray Train patches `print` in its workers to log through the root logger *and*, where Ray has
    wrapped stdout, to print as well, so every plain `print` reached the driver twice. Writing to
    the process's real stdout bypasses the patch; Ray forwards it to the driver once.
    """
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()
