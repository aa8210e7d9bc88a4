"""Quiet by default: one progress line per stage when nobody watches a terminal.

    logs.interactive()                # a terminal (or PNEUMO_VERBOSE=1): Ray's own progress output stays
    logs.worker_line(text)            # one line from inside a Ray Train worker, printed once
    with logs.Progress("features", total=4700) as bar:   # a long step: a bar in a terminal,
        bar.update(64)                                    # else a line every `every_s` seconds

`pneumo.ray_env.quiet_ray` turns Ray Data's progress reports off in non-interactive runs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

INTERACTIVE_ENV = "PNEUMO_INTERACTIVE"  # set by a driver on a terminal for its Ray workers


def interactive() -> bool:
    return (sys.stdout.isatty() or os.environ.get("PNEUMO_VERBOSE", "") not in ("", "0")
            or os.environ.get(INTERACTIVE_ENV, "") not in ("", "0"))


def worker_line(text: str) -> None:
    """One line from inside a Ray Train worker, printed once.

    Ray Train patches `print` in its workers to log through the root logger *and*, where Ray has
    wrapped stdout, to print as well, so every plain `print` reached the driver twice. Writing to
    the process's real stdout bypasses the patch; Ray forwards it to the driver once.
    """
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Images done, images/s and an ETA for a long step.

    In a terminal (`interactive()`) a tqdm bar (Ray's `tqdm_ray` inside a Ray worker, which the
    driver draws); otherwise one line every `every_s` seconds and one at the end, through `write`
    (default `worker_line`). `total=None`: no ETA.
    """

    def __init__(self, label: str, total: int | None = None, every_s: float = 5.0, unit: str = "images",
                 write: Callable[[str], None] | None = None, bar: bool | None = None):
        self.label, self.total, self.every_s, self.unit = label, total, every_s, unit
        self.write = write or worker_line
        self.done, self.t0 = 0, time.perf_counter()
        self.last, self.written = self.t0, -1  # when the last line was written, and at what count
        self._bar: Any = self._make_bar() if (interactive() if bar is None else bar) else None

    def _make_bar(self) -> Any:
        try:
            import ray

            if ray.is_initialized():  # in a worker, the driver draws it
                from ray.experimental.tqdm_ray import tqdm
            else:
                from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total, desc=self.label, unit=self.unit.rstrip("s") or "it")

    def line(self) -> str:
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        rate = self.done / elapsed
        of = f"/{self.total:,}" if self.total else ""
        eta = (f", ETA {_duration((self.total - self.done) / rate)}"
               if self.total and rate > 0 and self.done < self.total else "")
        return f"{self.label}: {self.done:,}{of} {self.unit}, {rate:.1f} {self.unit}/s{eta} ({_duration(elapsed)})"

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last, self.written = now, self.done
            self.write(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.written != self.done:  # the closing line, unless the last one said the same
            self.write(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
