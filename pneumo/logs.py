"""Quiet by default: one progress line per stage when nobody watches a terminal.

    logs.interactive()                # a terminal (or PNEUMO_VERBOSE=1): Ray's own progress output stays
    logs.worker_line(text)            # one line from inside a Ray Train worker, printed once
    with logs.Progress("features", total=4700) as bar:   # a long step: a bar in a terminal,
        bar.update(64)                                    # else a line every `every_s` seconds

`pneumo.ray_env.quiet_ray` turns Ray Data's progress reports off in non-interactive runs.

Non-interactive drivers start Ray with `log_to_driver=False` (Ray's own knob): the workers' output,
Ray's INFO lines and warnings among it, stays in Ray's log folder (`worker-*.out/err` under
/tmp/ray/session_latest/logs/). pneumo's own worker lines still reach the console: `start_console`
makes a Ray queue (`ray.util.queue.Queue`, a named actor) that `worker_line` puts its lines on and
a driver thread prints from.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

INTERACTIVE_ENV = "PNEUMO_INTERACTIVE"  # set by a driver on a terminal for its Ray workers
CONSOLE_ACTOR = "pneumo_console"  # the named Ray queue of worker lines a quiet driver prints
_console: dict[str, Any] = {}  # this process's queue handle (False: looked up, none there)


def interactive() -> bool:
    return (sys.stdout.isatty() or os.environ.get("PNEUMO_VERBOSE", "") not in ("", "0")
            or os.environ.get(INTERACTIVE_ENV, "") not in ("", "0"))


def worker_line(text: str) -> None:
    """One line from inside a Ray Train worker, printed once.

    Ray Train patches `print` in its workers to log through the root logger *and*, where Ray has
    wrapped stdout, to print as well, so every plain `print` reached the driver twice. Writing to
    the process's real stdout bypasses the patch; Ray forwards it to the driver once.
    """
    if _console_put(text):
        return
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()


def _console_put(text: str) -> bool:
    """Put `text` on the driver's console queue, if this Ray job has one."""
    handle = _console.get("handle")
    if handle is None:
        try:
            import ray

            handle = ray.get_actor(CONSOLE_ACTOR) if ray.is_initialized() else False
        except (ImportError, ValueError):  # ValueError: no such actor in this job
            handle = False
        _console["handle"] = handle
    if handle is False:
        return False
    handle.put_nowait.remote(text)  # one caller's calls run in order
    return True


def start_console() -> None:
    """In a quiet driver (Ray started with log_to_driver=False): print the workers' `worker_line`s.

    A daemon thread prints what they put on a named `ray.util.queue.Queue`; at exit what is left is printed.
    """
    import atexit
    import threading
    from queue import Empty

    from ray.util.queue import Queue

    if _console.get("thread") is not None and _console["thread"].is_alive():
        return
    _console.pop("handle", None)
    queue = Queue(actor_options={"name": CONSOLE_ACTOR, "num_cpus": 0})
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            try:
                text = queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - Ray shut down under us
                return
            print(text, flush=True)

    def drain() -> None:
        stop.set()
        try:
            for text in queue.get_nowait_batch(queue.qsize()):
                print(text, flush=True)
        except Exception:  # noqa: BLE001 - Ray is gone already: nothing left to print
            pass

    _console["thread"] = threading.Thread(target=pump, name="pneumo-console", daemon=True)
    _console["thread"].start()
    atexit.register(drain)


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
