"""Long steps show progress (`pneumo.logs.Progress`): lines with images, images/s and an ETA in
non-interactive runs, a bar in a terminal."""

from __future__ import annotations

import re

import pytest

from pneumo import logs


def test_non_interactive_prints_count_rate_and_eta_lines(monkeypatch) -> None:
    monkeypatch.delenv("PNEUMO_VERBOSE", raising=False)
    monkeypatch.delenv(logs.INTERACTIVE_ENV, raising=False)
    lines: list[str] = []
    with logs.Progress("[pneumo train] train features", total=300, every_s=0, write=lines.append) as p:
        assert p._bar is None  # pytest's stdout is no terminal
        for _ in range(3):
            p.update(100)
    assert len(lines) == 3  # one per update (every_s=0); the closing one would repeat the last
    assert re.fullmatch(r"\[pneumo train\] train features: 100/300 images, [\d.]+ images/s, ETA \d+m?\d*s \(\d+s\)",
                        lines[0]), lines[0]
    assert lines[-1].startswith("[pneumo train] train features: 300/300 images") and "ETA" not in lines[-1]


def test_lines_come_every_few_seconds_not_every_batch() -> None:
    lines: list[str] = []
    with logs.Progress("x", total=10_000, every_s=3600, write=lines.append, bar=False) as p:
        for _ in range(100):
            p.update(64)
    assert len(lines) == 1 and lines[0].startswith("x: 6,400/10,000 images")  # only the closing line


@pytest.mark.parametrize("env", ["PNEUMO_VERBOSE", logs.INTERACTIVE_ENV])
def test_a_terminal_gets_a_bar(monkeypatch, capsys, env: str) -> None:
    monkeypatch.setenv(env, "1")  # what a terminal (or a driver on one, for its workers) sets
    lines: list[str] = []
    with logs.Progress("train features", total=128, write=lines.append) as p:
        p.update(64)
        p.update(64)
    assert not lines and "128/128" in capsys.readouterr().err  # tqdm draws on stderr
