"""`pneumo sweep` on Ray Tune through the real training code, tracked in MLflow.

- every sweep file of ray_jobs/sweeps/ runs (its first trial, smoke sizes) through the real
  train_func on a real local Ray, writes the ranked table and the best bundle, and every trial is an
  MLflow run with its params, per-epoch metrics and the bundle as artifacts;
- ASHA stops a trial that is behind (fewer epochs than the one it is compared with);
- a sweep SIGKILLed after its first trial resumes with Tuner.restore and finishes without training
  that trial again;
- invalid spaces and options fail before Ray starts, listing the valid choices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, SWEEPS, TINY_TRIAL, sweep, wait_for, write_sweep

SMOKE = {  # per file: overrides that fit a 64-96 px toy set (stride 2 over three blocks needs 96 px)
    "r5_cnn_ablation.yaml": "image_size=96",
    "r3_optimizers.yaml": "image_size=64",
    "r4_baseline_vs_resnet.yaml": "image_size=64",
    "external_validity.yaml": "epochs=1",
}


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> Path:  # noqa: ANN001
    """72 small synthetic X-rays (both causes of pneumonia, so three-class sweeps run too)."""
    from pneumo.data.synth import synthesize

    root = tmp_path_factory.mktemp("sweepdata")
    synthesize(root, 72, seed=3, size_range=(96, 128))
    return root


def _mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return c.search_runs([exp.experiment_id])


def test_sweep_files_are_the_four_of_the_issue() -> None:
    assert sorted(p.name for p in SWEEPS.glob("*.yaml")) == sorted(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_every_sweep_file_runs_through_the_real_train_func(name, ray_local, sweep_data, tmp_path, tracking_env):  # noqa: ANN001
    overrides = f"{TINY_TRIAL},{SMOKE[name]}"
    result = sweep(sweep_data, SWEEPS / name, tmp_path / "sw", "--max-trials", "1", "--overrides", overrides,
                   "--name", f"smoke-{name[:-5]}")
    (row,) = result["trials"]
    assert row["status"] == "ok", row
    assert row["rank"] == 1 and 0.0 <= row["val_auc"] <= 1.0 and row["val_auc_ci"].startswith("[")
    assert row["worst_group"] and row["epochs"] >= 1
    out = tmp_path / "sw"
    for f in ("trials.md", "trials.csv", "trials.png", "sweep.json", "bundle/manifest.json"):
        assert (out / f).exists(), f
    assert "test" not in (out / "trials.md").read_text().split("\n", 2)[2]  # ranked on val, test not shown
    from pneumo.bundle.predict import Predictor

    assert Predictor(out / "bundle").manifest.sha256 == json.loads(
        Path(row["bundle"], "manifest.json").read_text())["sha256"]
    # MLflow: the sweep's run and its trial, nested; params, per-epoch metrics, the bundle as artifacts
    runs = _mlflow_runs(tracking_env, f"smoke-{name[:-5]}")
    trial = next(r for r in runs if r.data.tags.get("pneumo.trial_id") == row["trial_id"])
    parent = next(r for r in runs if r.info.run_id == trial.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["pneumo.best_trial"] == row["trial_id"] and parent.info.status == "FINISHED"
    assert trial.info.status == "FINISHED" and trial.data.params["model"]
    from mlflow import MlflowClient

    c = MlflowClient(tracking_env)
    epochs = row["epochs"]
    assert [m.step for m in c.get_metric_history(trial.info.run_id, "val_loss")] == list(range(1, epochs + 1))
    assert "final_val_auc" in trial.data.metrics and "final_val_auc_ci_low" in trial.data.metrics
    assert trial.data.tags["pneumo.data_fingerprint"] and "mlflow.source.git.commit" in trial.data.tags
    assert {a.path for a in c.list_artifacts(trial.info.run_id, "bundle")} >= {"bundle/manifest.json",
                                                                                "bundle/model.safetensors"}


SEED_SWEEP = """
base: {model: seed_cnn, weights: none, image_size: 48, epochs: 4, patience: 0, num_workers: 1, batch_size: 8,
       val_frac: 0.25, test_frac: 0.2, balance: none, optimizer: adam, num_to_keep: 1}
search:
  lr: {grid: [0.003, 0.0]}
metric: val_loss
max_concurrent_trials: 1
"""


def test_asha_stops_the_trial_that_is_behind(ray_local, sweep_data, tmp_path):  # noqa: ANN001
    """lr 0 never learns: at ASHA's first rungs its val loss is behind the learning trial's, so it
    is stopped with fewer epochs (and no bundle) while the good one runs all four."""
    config = write_sweep(tmp_path / "asha.yaml", SEED_SWEEP)
    result = sweep(sweep_data, config, tmp_path / "sw", "--scheduler", "asha", "--no-tracking")
    rows = {r["lr"]: r for r in result["trials"]}
    assert rows[0.003]["status"] == "ok" and rows[0.003]["epochs"] == 4, rows
    assert rows[0.0]["status"] == "stopped" and rows[0.0]["epochs"] < 4, rows
    assert result["best"]["lr"] == 0.003 and not rows[0.0].get("bundle")


KILL_SWEEP = SEED_SWEEP.replace("epochs: 4", "epochs: 2").replace("num_workers: 1", "num_workers: 2").replace("[0.003, 0.0]", "[0.001, 0.002, 0.003]")


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(ray_local, sweep_data, tmp_path):  # noqa: ANN001
    """SIGKILL the whole `pneumo sweep` (driver, its Ray, its trials) once its first trial has
    finished; the same command again restores the sweep and finishes the rest, and the finished
    trial is neither trained nor exported again."""
    config = write_sweep(tmp_path / "kill.yaml", KILL_SWEEP)
    out = tmp_path / "sw"
    argv = [str(sweep_data), "--config", str(config), "--out", str(out), "--no-tracking"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "PNEUMO_VERBOSE": "0"}
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "pneumo.cli", "sweep", *argv, "--max-concurrent-trials", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        done = wait_for(lambda: sorted(out.glob("trials/*/summary.json")) or proc.poll() is not None, 600,
                        "the first trial's summary")
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    printed = (tmp_path / "first.log").read_text()
    assert "[pneumo sweep]" in printed and "Configuration for experiment" not in printed, printed[-3000:]  # quiet
    first = done[0]
    stamp, starts = first.stat().st_mtime_ns, json.loads(first.read_text())["bundle"]
    assert len(list(out.glob("trials/*/summary.json"))) < 3  # killed with work left
    time.sleep(0.01)
    result = sweep(sweep_data, config, out, "--no-tracking")
    assert result["restored"] is True
    assert sorted(r["status"] for r in result["trials"]) == ["ok", "ok", "ok"], result["trials"]
    assert first.stat().st_mtime_ns == stamp  # the finished trial was not run again
    manifest = json.loads(Path(starts, "manifest.json").read_text())
    assert manifest["training"]["starts"] == [0] and manifest["training"]["epochs_run"] == 2


@pytest.mark.parametrize("text,needle", [
    ("search: {no_such_option: [1, 2]}", "not a training option"),
    ("search: {lr: {between: [1, 2]}}", "grid, choice, uniform"),
    ("search: {lr: {loguniform: [0, 1]}}", "low > 0"),
    ("base: {model: seed_cnn}\nsearch: {dropout: [0.1, 0.2]}", "not an option of seed_cnn"),
    ("search: {optimizer: [adam, nosuch]}", "is not one of"),
    ("search: {out: [a, b]}", "not a training option"),
    ("search: {lr: [0.1, 0.2]}", "no labelled images"),  # the data is checked before Ray too
    ("searcher: optuna\nsearch: {lr: [0.1, 0.2]}", "takes no grid"),
    ("base: {model: cnn_dropout, image_size: 48}\nsearch: {stride: [1, 2]}", "too small"),
])
def test_bad_sweep_files_fail_before_ray(text, needle, tmp_path):  # noqa: ANN001
    """Exit 2 with the reason (and the valid choices), and no Ray started: no sweep folder."""
    config = write_sweep(tmp_path / "bad.yaml", text)
    out = subprocess.run([sys.executable, "-m", "pneumo.cli", "sweep", str(tmp_path), "--config", str(config),
                          "--out", str(tmp_path / "sw")], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and needle in out.stderr, out.stderr[-800:]
    assert not (tmp_path / "sw").exists()
