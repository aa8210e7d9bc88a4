"""`pneumo demo`: the whole path on synthetic data, on an embedded local Ray.

    pneumo demo --out demo_out

1. synth    deterministic synthetic chest-like X-rays (1,000-2,000 px JPEGs)
2. eda      counts, sizes, duplicates, sample grid and class balance PNGs
3. train    Ray Train (2 CPU workers) -> model bundle + evaluation report and plots
4. score    Ray Data batch scoring of the archive -> a Delta Lake table, one row per file
5. serve    Ray Serve on 127.0.0.1, one real HTTP request, then shut down

Every step calls the same code as its own verb (`pneumo synth`, `pneumo eda`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pneumo import logs
from pneumo.config import parse_config
from pneumo.data import eda, synth
from pneumo.ray_env import ensure_ray
from pneumo.score import driver as score_driver
from pneumo.serve.app import ServeArgs, bind
from pneumo.train import cli as train_cli


@dataclass
class DemoConfig:
    """Run synth -> eda -> train -> score -> serve on synthetic data on an embedded local Ray."""

    out: str = field(default="demo_out", metadata={"help": "folder for everything the demo writes"})
    n: int = field(default=160, metadata={"help": "synthetic images"})
    seed: int = 0
    model: str = field(default="seed_cnn", metadata={"help": "registered model to train"})
    image_size: int = field(default=96, metadata={"help": "model input size (small keeps the demo quick)"})
    epochs: int = 6
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(title: str) -> float:
    print(f"=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


def _serve_one_request(bundle: str, image: Path) -> dict:
    from ray import serve

    if not logs.interactive():  # Serve's INFO lines ("Started Serve", "is ready at") stay in Ray's log folder
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # configured when ray.serve is imported
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        one = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        serve.run(bind(ServeArgs(bundle=bundle), autoscaling_config=one), name="pneumo", route_prefix="/")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict", data=image.read_bytes(),
            headers={"Content-Type": "image/jpeg"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
        print(f"POST /v1/predict {image.name} -> {json.dumps(answer)}")
        return answer
    finally:
        # the app, not the controller: `serve.shutdown()` kills the controller while its graceful_shutdown
        # task is pending, and the raylet reports that task as failed; this Ray stops with the demo
        serve.delete("pneumo")


def run_demo(cfg: DemoConfig) -> dict:

    out = Path(cfg.out).resolve()
    data, train_out, scores = out / "data", out / "train", out / "scores"
    started = time.perf_counter()
    ensure_ray(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)

    t = _step("1/5 synth: synthetic chest X-rays")
    synth.main([str(data), "--n", str(cfg.n), "--seed", str(cfg.seed)])
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("2/5 eda: describe the dataset")
    eda.main([str(data), "--out", str(out / "eda")])
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("3/5 train: Ray Train, then export a model bundle")
    rc = train_cli.main([
        str(data), "--out", str(train_out), "--model", cfg.model, "--weights", "none",
        "--image-size", str(cfg.image_size), "--epochs", str(cfg.epochs), "--num-workers", str(cfg.num_workers),
        "--batch-size", "16", "--lr", "0.001", "--seed", str(cfg.seed), "--threshold-method", "youden",
        "--tracking-uri", f"sqlite:///{out}/mlflow.db",  # a local MLflow store: no server needed
    ])
    if rc:
        raise SystemExit(f"demo: training failed (exit {rc})")
    bundle = str(train_out / "bundle")
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("4/5 score: Ray Data batch scoring into a Delta Lake table")
    rc = score_driver.main([str(data), "--bundle", bundle, "--out", str(scores)])
    if rc:
        raise SystemExit(f"demo: scoring failed (exit {rc})")
    print(f"({time.perf_counter() - t:.1f}s)")

    t = _step("5/5 serve: Ray Serve, one real HTTP request")
    image = sorted((data / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    answer = _serve_one_request(bundle, image)
    print(f"({time.perf_counter() - t:.1f}s)")

    print(f"demo finished in {time.perf_counter() - started:.0f}s; everything is under {out}/:")
    for label, path in [
        ("data", data), ("eda charts", out / "eda"), ("model bundle", train_out / "bundle"),
        ("evaluation report", train_out / "report"), ("batch scores (Delta Lake table)", scores),
        ("MLflow runs (SQLite)", out / "mlflow.db"),
    ]:
        print(f"  {label:<24} {path}")
    print(f"next: pneumo serve {bundle}   # then open http://127.0.0.1:8000/")
    print(f"      mlflow ui --backend-store-uri sqlite:///{out}/mlflow.db   # the training run, http://127.0.0.1:5000/")
    return {"bundle": bundle, "scores": str(scores), "answer": answer}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DemoConfig, argv, prog="pneumo demo")
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
