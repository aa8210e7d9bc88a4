"""Real kills: SIGKILL a `pneumo train` driver (and its embedded Ray) after epoch 2, rerun, resume at 3.

The run is a real `pneumo train` process in its own process group with its own embedded Ray
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
from pathlib import Path

import pytest

PNEUMO = str(Path(sys.executable).parent / "pneumo")
TRAIN = ["--model", "seed_cnn", "--weights", "none", "--image-size", "48", "--batch-size", "16",
         "--val-frac", "0.2", "--test-frac", "0.2", "--num-workers", "1", "--epochs", "5", "--patience", "0",
         "--max-steps-per-epoch", "3", "--no-report"]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
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
