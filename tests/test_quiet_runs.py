"""Quiet by default: a non-interactive `pneumo train` and `pneumo score` print one line per stage.

Each verb runs as a user's cron job would (a subprocess, stdout a pipe, no PNEUMO_VERBOSE), at tiny
sizes, and its whole output (stdout and stderr) is counted and read: no Ray-internal line (worker
prefixes, `(raylet)`, Ray Train's `TrainingReport`s, Ray's INFO lines), no Python warning. Then
`PNEUMO_VERBOSE=1` brings Ray's own lines back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNEUMO = str(Path(sys.executable).parent / "pneumo")
RAY_INTERNAL = re.compile(
    r"Warning\b|WARNING|warnings\.warn|\(raylet\)|\([A-Za-z_]+ pid=\d+\)|TrainingReport|Traceback|"
    r"\bINFO\b|Started a local Ray instance|core_worker\.cc|PreemptionWatcher|exclude_resources")
# Ray Data's own line, on every actor pool (README: The `pneumo` command; ray-project/ray#57733)
KNOWN = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the "
                   r"object store and max_restarts > 0")


def _run(args: list[str], cwd: Path, verbose: bool = False) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PNEUMO_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    if verbose:
        env["PNEUMO_VERBOSE"] = "1"
    proc = subprocess.run([PNEUMO, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-80:])
    return lines


def _noise(lines: list[str]) -> list[str]:
    return [line for line in lines if RAY_INTERNAL.search(line) and not KNOWN.search(line)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from pneumo.data.synth import synthesize

    root = tmp_path_factory.mktemp("quiet")
    synthesize(root / "data", 120, seed=0, size_range=(96, 128), workers=1)
    lines = _run(["train", "data", "--config", str(REPO / "ray_jobs/recipes/seed_cnn.yaml"), "--out", "run",
                  "--image-size", "64", "--epochs", "2", "--num-workers", "1", "--no-tracking"], root)
    return root, lines


def test_train_prints_one_line_per_stage(trained: tuple[Path, list[str]]) -> None:
    _, lines = trained
    text = "\n".join(lines)
    assert not _noise(lines), f"Ray-internal or warning lines in `pneumo train`'s output:\n{text}"
    assert len(lines) <= 15, f"{len(lines)} lines:\n{text}"
    # the workers' own lines still arrive (through the console queue, not Ray's log forwarding)
    assert sum("[pneumo train] epoch" in line for line in lines) == 2, text
    assert any("done in" in line for line in lines), text


def test_score_prints_one_line_per_stage_and_verbose_brings_ray_back(trained: tuple[Path, list[str]]) -> None:
    root, _ = trained
    lines = _run(["score", "data", "--bundle", "run/bundle", "--out", "scores"], root)
    text = "\n".join(lines)
    assert not _noise(lines), f"Ray-internal or warning lines in `pneumo score`'s output:\n{text}"
    assert len(lines) <= 10, f"{len(lines)} lines:\n{text}"
    assert any("committed to" in line for line in lines), text
    verbose = _run(["score", "data", "--bundle", "run/bundle", "--out", "scores_verbose"], root, verbose=True)
    assert _noise(verbose), "PNEUMO_VERBOSE=1 should bring Ray's own lines back:\n" + "\n".join(verbose)
