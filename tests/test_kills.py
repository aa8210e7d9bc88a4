"""Real kills: SIGKILL a `pneumo train` driver (and its embedded Ray) after epoch 2, rerun, resume at 3;
SIGKILL `pneumo score --incremental` at random moments, again and again, then finish: every file once
in the committed history of its Delta table, and no row of a killed run visible.

Each run is a real `pneumo train` / `pneumo score` process in its own process group with its own embedded Ray
(RAY_ADDRESS=local, its own RAY_TMPDIR), so the kill takes the driver, the controller and the
workers down at once, as a crashed node or an OOM-killed job would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import jpeg_bytes, make_threshold_bundle

PNEUMO = str(Path(sys.executable).parent / "pneumo")
TRAIN = ["--model", "seed_cnn", "--weights", "none", "--image-size", "48", "--batch-size", "16",
         "--val-frac", "0.2", "--test-frac", "0.2", "--num-workers", "1", "--epochs", "5", "--patience", "0",
         "--max-steps-per-epoch", "3", "--no-report"]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # PNEUMO_VERBOSE: Ray's own "Started a local Ray instance" line marks the "Ray up" phase
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1", PNEUMO_VERBOSE="1")
    return env


def _complete(folder: Path) -> bool:
    try:
        return json.loads((folder / "state.json").read_text())["epoch"] >= 2 and (folder / "optim.pt").exists()
    except (OSError, ValueError, KeyError):
        return False


def _kill_tree(proc: subprocess.Popen, ray_tmp: Path) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Ray's own daemons may have left the group: kill whatever still runs from this run's RAY_TMPDIR
    subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)


@pytest.mark.slow
def test_training_driver_sigkilled_after_epoch_2_resumes_at_epoch_3(synth_data, tmp_path) -> None:
    out = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="pk", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    cmd = [PNEUMO, "train", str(synth_data), "--out", str(out), *TRAIN]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, env=_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    checkpoint = out / "ray_results" / "run" / "epoch_0002"
    deadline = time.monotonic() + 240
    try:
        while not _complete(checkpoint):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch-2 checkpoint in time"
            time.sleep(0.2)
    finally:
        _kill_tree(proc, ray_tmp)
    assert not (out / "bundle" / "manifest.json").exists()  # killed before the end: no bundle yet

    try:
        rerun = subprocess.run(cmd, env=_env(ray_tmp), capture_output=True, text=True, timeout=400)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    training = json.loads((out / "bundle" / "manifest.json").read_text())["training"]
    epochs = [h["epoch"] for h in training["history"]]
    assert epochs == [1, 2, 3, 4, 5]  # nothing repeated, nothing skipped
    assert training["starts"][0] == 0 and training["starts"][-1] >= 2  # the rerun began after epoch 2 or later
    assert training["epochs_run"] == 5


# ---------------------------------------------------------------- pneumo score, killed again and again

SCORE_FAST = ["--incremental", "--batch-size", "4", "--read-batch-size", "4", "--max-actors", "1"]
N_IMAGES = 80
BAD = {"empty.png": b"", "notes.jpeg": b"not an image\n", "readme.txt": b"listed, unsupported",
       "truncated.jpeg": b"\xff\xd8\xff\xe0" + b"\0" * 64}
RAY_UP = "Started a local Ray instance"
# Where each kill is aimed (shuffled by a seeded RNG, the commit last), each with a random jitter:
# a delay after the start, after Ray is up, after the run's first data file, at its commit.
AIMS = ["start-up"] * 3 + ["ray up"] * 3 + ["parts"] * 4
PER_CYCLE_S = 240


def _state(out: Path) -> tuple[set[str], int]:
    """(the data files at the table's root, committed or not; the commits in its log)."""
    files = {p.name for p in out.glob("part-*.parquet")} if out.is_dir() else set()
    return files, len(list((out / "_delta_log").glob("*.json"))) if out.is_dir() else 0


def _phase(out: Path, before: tuple[set[str], int], log: str) -> str:
    """Where the killed run was, from what it left on disk and in its log."""
    files, commits = _state(out)
    if commits > before[1]:
        return "committed, not yet exited"
    if files - before[0]:
        return "files written, no commit"
    return "Ray up, no file yet" if RAY_UP in log else "start-up (imports, listing, Ray start)"


def final_run_id(summary: str) -> str:
    """The run id from `pneumo score`'s summary (`run <id>: committed to ...`)."""
    return next(line.split()[1].rstrip(":") for line in summary.splitlines() if line.startswith("run "))


def _wait_for(proc: subprocess.Popen, ready, timeout: float) -> bool:  # noqa: ANN001
    """Until `ready()` (True) or the process ends or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_score_sigkilled_at_random_moments_then_incremental_scores_every_file_once(tmp_path) -> None:
    """`pneumo score --incremental` SIGKILLed (whole process group, embedded Ray) at seeded random
    moments in each phase of its run (start-up, Ray up, writing files, at the commit), over and
    over while the archive grows; readers never raise after a kill, and one last run leaves every
    input with exactly one committed row, none of them from a killed run."""
    import random

    from pneumo.score.runs import committed_runs, read_committed, read_results

    bundle, data, out = make_threshold_bundle(tmp_path / "bundle"), tmp_path / "data", tmp_path / "out"
    for i in range(N_IMAGES):
        (data / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (data / f"d{i % 4}" / f"img{i:03d}.jpeg").write_bytes(jpeg_bytes(i, size=(64, 64), level=None if i % 3 else 150))
    for name, blob in BAD.items():
        (data / name).write_bytes(blob)
    ray_tmp = Path(tempfile.mkdtemp(prefix="pk", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    cmd = [PNEUMO, "score", str(data), "--bundle", str(bundle), "--out", str(out), *SCORE_FAST]
    rng = random.Random(11)
    aims = rng.sample(AIMS, len(AIMS)) + ["commit"]
    kills, phases, added, t_start = 0, Counter(), 0, time.monotonic()
    queue, retries, cycle = list(aims), 4, 0  # a run that finished before its kill is tried once more
    try:
        while queue:
            aim, cycle = queue.pop(0), cycle + 1
            before = _state(out)
            log_path = tmp_path / f"cycle{cycle}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, env=_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                t0 = time.monotonic()
                try:
                    if aim == "start-up":
                        delay = rng.uniform(0.1, 4.0)
                        _wait_for(proc, lambda d=delay, t=t0: time.monotonic() - t > d, PER_CYCLE_S)
                    elif aim == "ray up":
                        _wait_for(proc, lambda p=log_path: RAY_UP in p.read_text(errors="replace"), PER_CYCLE_S)
                        _wait_for(proc, lambda d=rng.uniform(0.0, 2.0), t=time.monotonic(): time.monotonic() - t > d, 10)
                    elif aim == "parts":
                        _wait_for(proc, lambda b=before: _state(out)[0] - b[0], PER_CYCLE_S)
                        _wait_for(proc, lambda d=rng.uniform(0.0, 0.5), t=time.monotonic(): time.monotonic() - t > d, 10)
                    else:
                        _wait_for(proc, lambda b=before: _state(out)[1] > b[1], PER_CYCLE_S)
                    if proc.poll() is None:
                        kills += 1
                        phases[_phase(out, before, log_path.read_text(errors="replace"))] += 1
                    else:
                        phases["finished before the kill"] += 1
                        if retries and aim != "commit":  # the run was faster than the aim: again, at this phase
                            retries -= 1
                            queue.insert(0, aim)
                finally:
                    _kill_tree(proc, ray_tmp)
            committed_runs(str(out))  # after every kill: readers never raise
            read_results(str(out))
            for _ in range(3):  # the archive grows between nights
                (data / "new").mkdir(exist_ok=True)
                (data / "new" / f"n{added:03d}.jpeg").write_bytes(jpeg_bytes(1000 + added, size=(64, 64)))
                added += 1

        t0 = time.monotonic()
        final = subprocess.run(cmd, env=_env(ray_tmp), capture_output=True, text=True, timeout=600)
        final_s = time.monotonic() - t0
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert final.returncode == 0, final.stderr[-3000:]

    inputs = sorted(str(p) for p in data.rglob("*") if p.is_file())
    rows = read_committed(str(out)).to_pandas()
    committed = {m["run_id"] for m in committed_runs(str(out))}
    counts = Counter(rows.path)
    duplicates = sorted(p for p, c in counts.items() if c > 1)
    missing = sorted(set(inputs) - set(counts))
    summary = (f"kill test: {kills} kills in {cycle} cycles, phases {dict(phases)}; final run {final_s:.0f} s; "
               f"{len(inputs)} inputs, {len(rows)} committed rows in {len(committed_runs(str(out)))} runs, "
               f"duplicates {len(duplicates)}, missing {len(missing)}, {time.monotonic() - t_start:.0f} s in all")
    print(summary)
    assert kills >= 10, summary
    assert not duplicates and not missing and len(rows) == len(inputs), summary
    assert set(rows.run_id) <= committed and final_run_id(final.stdout) in committed, summary  # no killed run's rows
    assert set(rows[rows.status == "error"].path) == {str(data / name) for name in BAD}
