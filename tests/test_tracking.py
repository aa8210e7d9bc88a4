"""Tracking over HTTP: a real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1.

- a tiny sweep logs to it; MlflowClient reads back the sweep's run and its trial (nested), the
  trial's params, its per-epoch metrics and its bundle as artifacts; `--register` makes the best
  bundle a version, which `resolve_bundle` downloads (proxied artifacts) and hash-checks;
- a tracking server that is down is one warning line: training finishes and writes its bundle.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, sweep, wait_for, write_sweep

from pneumo.config import parse_config
from pneumo.train.config import TrainConfig

TINY_SWEEP = """
base: {model: seed_cnn, weights: none, image_size: 48, epochs: 2, patience: 0, num_workers: 1, batch_size: 8,
       val_frac: 0.25, test_frac: 0.2, max_steps_per_epoch: 2, num_to_keep: 1}
search:
  lr: {grid: [0.002]}
metric: val_auc
"""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    """`mlflow server` on a free 127.0.0.1 port, SQLite backend, artifacts proxied from a folder."""
    root = tmp_path_factory.mktemp("mlflowserver")
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def up() -> bool:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 180, "mlflow server answering /health", interval=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_a_sweep_over_http_is_read_back_with_mlflowclient(mlflow_server, ray_local, synth_data, tmp_path):  # noqa: ANN001
    from mlflow import MlflowClient

    from pneumo.bundle.predict import Predictor
    from pneumo.bundle.registry import resolve_bundle

    config = write_sweep(tmp_path / "tiny.yaml", TINY_SWEEP)
    result = sweep(synth_data, config, tmp_path / "sw", "--tracking-uri", mlflow_server, "--name", "http-sweep",
                   "--register", "pneumo-http")
    (row,) = result["trials"]
    assert row["status"] == "ok", row
    c = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    exp = c.get_experiment_by_name("http-sweep")
    runs = {r.info.run_id: r for r in c.search_runs([exp.experiment_id])}
    trial = runs[row["mlflow_run"]]
    parent = runs[trial.data.tags["mlflow.parentRunId"]]
    assert parent.data.tags["pneumo.best_trial"] == row["trial_id"]
    assert trial.data.params["lr"] == "0.002" and trial.data.params["model"] == "seed_cnn"
    history = c.get_metric_history(trial.info.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2]
    assert {"train_loss", "val_loss", "val_sensitivity", "val_specificity", "lr", "train_images_per_s",
            "final_val_auc", "final_test_auc"} <= set(trial.data.metrics)
    files = {a.path for a in c.list_artifacts(trial.info.run_id, "bundle")}
    assert "bundle/manifest.json" in files and "bundle/model.onnx" in files
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"trials.md", "trials.csv", "trials.png"}
    # the registered version: proxied artifacts, so resolving downloads it (and checks its hash)
    assert result["registered"]["uri"] == "models:/pneumo-http/1"
    loc = resolve_bundle("models:/pneumo-http/1", None, mlflow_server)
    assert loc.source == "models:/pneumo-http/1" and "registry-cache" in loc.uri
    assert Predictor(loc).manifest.sha256 == c.get_model_version("pneumo-http", "1").tags["bundle_sha256"]


def test_a_tracking_server_that_is_down_is_a_warning_not_a_failure(ray_local, synth_data, tmp_path, capfd):  # noqa: ANN001
    from pneumo.train.driver import run

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = parse_config(TrainConfig, [str(synth_data), "--out", str(tmp_path / "run"), "--model", "seed_cnn",
                                     "--weights", "none", "--image-size", "48", "--epochs", "1", "--num-workers", "1",
                                     "--batch-size", "8", "--max-steps-per-epoch", "2", "--val-frac", "0.25",
                                     "--no-report", "--tracking-uri", down, "--register", "pneumo-down"])
    summary = run(cfg)
    assert Path(summary["bundle"], "manifest.json").exists() and summary["mlflow"] is None
    err = capfd.readouterr().err
    assert "warning: tracking:" in err and "this run is not tracked" in err
    assert "registering the bundle as pneumo-down failed" in err
