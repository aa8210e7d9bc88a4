"""Quiet by default: one progress line per stage when nobody watches a terminal.

    logs.quiet_ray()                  # before the first Ray Data / Ray Train call of a verb
    logs.worker_line(text)            # one line from inside a Ray Train worker, printed once

In a non-interactive run (CI, `ray job submit`, cron: stdout is not a TTY) Ray Data would print
its progress as a page of `logging_progress` lines per dataset. `quiet_ray` turns those progress
reports off and lowers Ray Data's console handler to warnings; the full INFO log still goes to
`ray-data.log` in Ray's session log folder (`/tmp/ray/session_latest/logs/`). Interactive runs
keep Ray's progress bars. `PNEUMO_VERBOSE=1` keeps everything.
"""

from __future__ import annotations

import logging
import os
import sys


def interactive() -> bool:
    return sys.stdout.isatty() or os.environ.get("PNEUMO_VERBOSE", "") not in ("", "0")


def quiet_ray() -> None:
    if interactive():
        return
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray's "progress bars disabled" notice: deliberate here
    for handler in logging.getLogger("ray.data").handlers:
        if not hasattr(handler, "baseFilename") and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


def worker_line(text: str) -> None:
    """One line from inside a Ray Train worker, printed once.

    Ray Train patches `print` in its workers to log through the root logger *and*, where Ray has
    wrapped stdout, to print as well, so every plain `print` reached the driver twice. Writing to
    the process's real stdout bypasses the patch; Ray forwards it to the driver once.
    """
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()
