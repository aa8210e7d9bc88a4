"""CPU seconds of this process and its descendants, per process: the benchmarks' load-independent
cost measure (`with CPUMeter() as m: ...; m.seconds, m.by_process()`)."""

from __future__ import annotations

import os
import threading


def _title(pid: int) -> str:
    """A process's title: Ray's `ray::NAME` for its workers and actors, else the program and its
    first argument (`python bench_serve.py`, `raylet`, `gcs_server`)."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return str(pid)
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return str(pid)
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    prog = os.path.basename(words[0])
    if prog.startswith("python") and len(words) > 1:
        return f"{prog} {os.path.basename(words[1]) if not words[1].startswith('-') else ' '.join(words[1:3])}"
    return prog


class CPUMeter:
    """CPU seconds (user + system) used by this process and all its descendants (DataLoader
    workers; the local Ray's raylet, workers and actors) while open, sampled from /proc every
    0.2 s so processes that exit in between still count (up to their last sample). On a shared
    machine wall time depends on what else runs; CPU seconds per image much less."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self.start: dict[int, float] = {}
        self.titles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _tree() -> dict[int, float]:
        tick = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        mine, todo = {}, [os.getpid()]
        while todo:
            pid = todo.pop()
            if pid in stats and pid not in mine:
                mine[pid] = stats[pid][1]
                todo += [c for c, (ppid, _) in stats.items() if ppid == pid]
        return mine

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self) -> None:
        for pid, cpu in self._tree().items():
            self.seen[pid] = cpu
            title = _title(pid)  # a Ray worker's title names its task or actor, and is `ray::IDLE` in between
            if title != "ray::IDLE" or pid not in self.titles:
                self.titles[pid] = title

    def __enter__(self) -> CPUMeter:
        self.start = self._tree()
        self.seen = dict(self.start)
        self.titles = {pid: _title(pid) for pid in self.start}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())

    def by_process(self) -> dict[str, float]:
        """CPU seconds per process title (Ray names its actors `ray::ProxyActor`,
        `ray::ServeReplica:APP:DEPLOYMENT`, ...; this process is `this process`), largest first."""
        out: dict[str, float] = {}
        for pid, cpu in self.seen.items():
            name = "this process" if pid == os.getpid() else self.titles.get(pid, str(pid))
            out[name] = out.get(name, 0.0) + cpu - self.start.get(pid, 0.0)
        return dict(sorted(((k, round(v, 2)) for k, v in out.items() if v > 0.005), key=lambda kv: -kv[1]))
