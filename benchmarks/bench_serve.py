"""Serving benchmark: pneumo on Ray Serve vs a plain FastAPI + uvicorn process, in one run.

    .venv/bin/python benchmarks/bench_serve.py                  # full run (a few minutes)
    .venv/bin/python benchmarks/bench_serve.py --requests 100   # fewer requests per level

All sides serve the same bundle (efficientnet_lite0 with its packaged ImageNet weights and a
2-class head, saved with pneumo.bundle) with the same preprocessing (pneumo.preprocess.load_image):

- (a) pneumo: `pneumo.serving.bind` on a local Ray: proxy -> one `PneumoService` deployment
  (FastAPI ingress and `@serve.batch` in each replica; batches form from concurrent requests),
  engine auto (the fastest CPU engine whose gate passed on the bundle);
- (b) baseline: one uvicorn process, one FastAPI endpoint, one image per forward pass (sync
  endpoint in FastAPI's thread pool), eager torch fp32 (the issue's baseline);
- (c) peer: the same plain process on the engine pneumo's `auto` picks (`--peer-engine`,
  `--peer-precision`; default auto/auto: the fastest gated engine, the hard peer on one machine).

Load: an asyncio httpx client on loopback posting real JPEGs from ../shared/data/chest_xray_224
(synthetic PNGs when absent); requests/s and p50/p95/p99 latency at concurrency 1, 8, 32, then
the ratio. Then autoscaling: the model deployment at min 1 / max N replicas under load at
concurrency 32 and idle afterwards, with `serve.status()` polled and every replica-count change
printed with its timestamp. Results go to stdout and to --out (JSON).
"""

# no `from __future__ import annotations`: FastAPI resolves the nested endpoint's annotations at runtime

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- inputs


def make_bundle(out: Path) -> str:
    from pneumo.bundle.store import save_bundle
    from pneumo.models.factory import get_model
    from pneumo.models.zoo import get_spec

    model = get_model("efficientnet_lite0", 2, weights="pretrained")
    save_bundle(model, str(out), "efficientnet_lite0", ["NORMAL", "PNEUMONIA"], get_spec("efficientnet_lite0").input)
    return str(out)


def load_images(n: int) -> tuple[list[bytes], str]:
    root = SHARED / "chest_xray_224" / "train"
    files = sorted((root / "NORMAL").glob("*.jpeg"))[: n // 2] + sorted((root / "PNEUMONIA").glob("*.jpeg"))[: n // 2]
    if files:
        return [f.read_bytes() for f in files], f"{len(files)} real JPEGs from {root}"
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((224, 224)) * 255).astype(np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out, f"{n} synthetic 224x224 JPEGs ({root} not found)"


# ---------------------------------------------------------------- (b) the plain baseline


def baseline_app(bundle: str, precision: str, engine: str = "torch"):  # noqa: ANN201
    """One FastAPI endpoint: decode with load_image, one forward pass per request."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import DecodeError, load_image

    predictor = Predictor(bundle, device="cpu", precision=precision, engine=engine)
    app = FastAPI()

    def score(data: bytes) -> dict:
        probs = predictor.predict(load_image(data, "", predictor.spec)[None])
        return {"label": predictor.labels(probs)[0], "probability": float(predictor.positive_probability(probs)[0])}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        data = await request.body()
        try:
            return JSONResponse(await run_in_threadpool(score, data))
        except DecodeError as exc:
            return JSONResponse({"error": exc.reason}, status_code=400)

    return app


def run_baseline_server(bundle: str, port: int, precision: str, engine: str) -> None:
    import uvicorn

    uvicorn.run(baseline_app(bundle, precision, engine), host="127.0.0.1", port=port, log_level="warning",
                workers=1)


def start_baseline(bundle: str, precision: str, engine: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", "--bundle", bundle,
                             "--port", str(port), "--precision", precision, "--engine", engine])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/docs", proc=proc)
    return proc, url + "/predict"


def wait_http(url: str, timeout: float = 180, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s")


# ---------------------------------------------------------------- load


async def _load(url: str, images: list[bytes], concurrency: int, n: int | None, duration: float | None,
                stop: threading.Event | None = None) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    issued = 0
    t_end = time.perf_counter() + duration if duration else None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued, errors
            while True:
                if n is not None and issued >= n:
                    return
                if t_end is not None and time.perf_counter() >= t_end:
                    return
                if stop is not None and stop.is_set():
                    return
                i = issued
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=images[i % len(images)], headers={"content-type": "image/jpeg"})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - t0) * 1000)
                errors += 0 if ok else 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "rps": round(len(lat) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def load(url: str, images: list[bytes], concurrency: int, n: int | None = None, duration: float | None = None,
         stop: threading.Event | None = None) -> dict:
    return asyncio.run(_load(url, images, concurrency, n, duration, stop))


def measure(name: str, url: str, images: list[bytes], levels: list[int], requests: int) -> list[dict]:
    out = []
    for c in levels:
        load(url, images, c, n=max(2 * c, 8))  # warm-up (and batches of this size) at this level
        n = max(requests if c > 1 else requests // 4, 2 * c)
        row = {"system": name, **load(url, images, c, n=n), "loadavg_1m": round(os.getloadavg()[0], 1)}
        print(f"  {name:<9} c={c:<3} {row['requests']:>4} req  {row['rps']:>7.2f} req/s  p50 {row['p50_ms']:>7.1f}  "
              f"p95 {row['p95_ms']:>7.1f}  p99 {row['p99_ms']:>7.1f} ms  errors {row['errors']}  "
              f"(load avg {row['loadavg_1m']})", flush=True)
        out.append(row)
    return out


# ---------------------------------------------------------------- (a) pneumo on Ray Serve


def start_serve(num_cpus: int) -> str:
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(base: str, bundle: str, args: dict, **options) -> str:  # noqa: ANN003
    """App settings in `args` (ServeArgs), scaling and batching as deployment `options`."""
    from ray import serve

    from pneumo.serve.app import ServeArgs, bind

    serve.run(bind(ServeArgs(bundle=bundle, **args), **options), name="pneumo", route_prefix="/")
    wait_http(base + "/readyz")
    return base + "/v1/predict"


def replica_states() -> dict[str, int]:
    """The model deployment's replica counts by state, e.g. {"RUNNING": 1, "STARTING": 1}."""
    from ray import serve

    app = serve.status().applications.get("pneumo")
    dep = app.deployments.get("PneumoService") if app else None
    return {str(k).rsplit(".", 1)[-1]: int(v) for k, v in (dep.replica_states if dep else {}).items() if v}


def model_replicas() -> int:
    return replica_states().get("RUNNING", 0)


def autoscaling_demo(url: str, images: list[bytes], max_load_s: float, idle_timeout_s: float, min_r: int,
                     max_r: int, concurrency: int = 32, hold_s: float = 10) -> dict:
    """Replicas over time under load (until max_r run for hold_s, or max_load_s), then idle
    (until only min_r run, or idle_timeout_s); every change of replica states with its timestamp."""
    t0 = time.time()
    timeline: list[tuple] = []
    phase = ["load"]
    stop_load, stop_poll = threading.Event(), threading.Event()
    stats: dict = {}

    def poll() -> None:
        last = None
        while not stop_poll.is_set():
            states = replica_states()
            if states != last:
                stamp = time.time() - t0
                n = states.get("RUNNING", 0)
                timeline.append((round(stamp, 1), phase[0], n, states))
                print(f"  t={stamp:6.1f}s [{time.strftime('%H:%M:%S')}] {phase[0]:<4} model replicas running: {n}  "
                      f"{states}", flush=True)
                last = states
            time.sleep(0.5)

    def drive() -> None:
        stats.update(load(url, images, concurrency, duration=max_load_s, stop=stop_load))

    poller, driver = threading.Thread(target=poll, daemon=True), threading.Thread(target=drive, daemon=True)
    poller.start()
    driver.start()
    at_max_since = None
    while driver.is_alive():
        if replica_states() == {"RUNNING": max_r}:
            at_max_since = at_max_since or time.time()
            if time.time() - at_max_since >= hold_s:
                stop_load.set()
        time.sleep(0.5)
    driver.join()
    phase[0] = "idle"
    load_end = time.time() - t0
    deadline = time.time() + idle_timeout_s
    while time.time() < deadline and replica_states() != {"RUNNING": min_r}:
        time.sleep(1)
    time.sleep(1.5)
    stop_poll.set()
    poller.join()
    return {"timeline": timeline, "load": stats, "peak": max(t[2] for t in timeline),
            "end": timeline[-1][2], "load_s": round(load_end, 1)}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle to serve (default: efficientnet_lite0 pretrained, saved to a temp dir)")
    p.add_argument("--requests", type=int, default=240, help="requests per level at concurrency 8 and 32")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "int8"])
    p.add_argument("--engine", default="torch", help=argparse.SUPPRESS)
    p.add_argument("--peer-engine", default="auto", help="(c)'s engine: auto (pneumo's choice), onnxruntime, openvino")
    p.add_argument("--peer-precision", default="auto", help="(c)'s precision (auto: pneumo's choice)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    p.add_argument("--replicas", type=int, default=1, help="model replicas for the throughput runs")
    p.add_argument("--replica-cpus", type=float, default=2, help="CPUs (= torch threads) per model replica")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.005)
    p.add_argument("--autoscale-max", type=int, default=2)
    p.add_argument("--autoscale-load-s", type=float, default=120, help="longest load phase")
    p.add_argument("--skip-autoscale", action="store_true")
    p.add_argument("--out", default="bench_serve.json")
    p.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.baseline_server:
        run_baseline_server(a.bundle, a.port, a.precision, a.engine)
        return 0

    levels = [int(x) for x in a.levels.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    bundle = a.bundle or make_bundle(Path(tmp.name) / "bundle")
    images, source = load_images(64)
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}")
    print(f"bundle: {bundle} (efficientnet_lite0 unless --bundle); inputs: {source}")
    result: dict = {"machine": {"cpu": cpu, "cores": os.cpu_count()}, "inputs": source, "args": vars(a), "runs": []}

    for name, engine, precision in (("baseline", "torch", a.precision),
                                    ("engine-peer", a.peer_engine, a.peer_precision)):
        print(f"({'b' if engine == 'torch' else 'c'}) {name}: plain FastAPI + uvicorn, one process, one image per "
              f"forward pass, {engine} {precision}")
        proc, base_url = start_baseline(bundle, precision, engine)
        try:
            result["runs"] += measure(name, base_url, images, levels, a.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"(a) pneumo on Ray Serve: {a.replicas} model replica(s) x {a.replica_cpus} CPU, "
          f"@serve.batch max {a.max_batch_size}, wait {a.batch_wait_s}s")
    from ray import serve

    base = start_serve(a.ray_cpus)
    try:
        args = {"precision": "auto" if a.precision == "fp32" else a.precision}
        batching = {"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_s}
        url = deploy(base, bundle, args, user_config=batching, ray_actor_options={"num_cpus": a.replica_cpus},
                     autoscaling_config={"min_replicas": a.replicas, "max_replicas": a.replicas,
                                         "initial_replicas": a.replicas})
        result["runs"] += measure("pneumo", url, images, levels, a.requests)

        by = {(r["system"], r["concurrency"]): r for r in result["runs"]}
        print("ratio pneumo / baseline (eager torch) and pneumo / engine peer (requests/s):")
        result["ratio"], result["ratio_vs_engine_peer"] = {}, {}
        for c in levels:
            ratio = by[("pneumo", c)]["rps"] / max(by[("baseline", c)]["rps"], 1e-9)
            peer = by[("pneumo", c)]["rps"] / max(by[("engine-peer", c)]["rps"], 1e-9)
            result["ratio"][c], result["ratio_vs_engine_peer"][c] = round(ratio, 2), round(peer, 2)
            print(f"  c={c:<3} {ratio:5.2f}x vs eager torch   {peer:5.2f}x vs engine peer")

        if not a.skip_autoscale:
            print(f"autoscaling: min 1, max {a.autoscale_max} model replicas x 1 CPU, target_ongoing_requests 4, "
                  f"upscale_delay 2 s, downscale_delay 10 s; load at c=32 until max replicas run for 10 s "
                  f"(at most {a.autoscale_load_s:.0f} s), then idle")
            serve.delete("pneumo")
            url = deploy(base, bundle, args, user_config=batching, ray_actor_options={"num_cpus": 1},
                         autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": a.autoscale_max,
                                             "target_ongoing_requests": 4, "upscale_delay_s": 2,
                                             "downscale_delay_s": 10})
            result["autoscaling"] = autoscaling_demo(url, images, a.autoscale_load_s, idle_timeout_s=120, min_r=1,
                                                     max_r=a.autoscale_max)
            s = result["autoscaling"]
            print(f"  peak {s['peak']} replicas, back to {s['end']}; load phase {s['load_s']} s, {s['load']['rps']} req/s, "
                  f"errors {s['load']['errors']}")
    finally:
        serve.shutdown()
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
