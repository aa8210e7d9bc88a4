"""Serving under stress: overload far beyond capacity, a health-probe flood with Grad-CAM under
load, and a replica killed under load.

    nice -n 10 .venv/bin/python benchmarks/bench_reliability.py [--uploads 1024] [--seconds 30] [--json OUT]

1. **Overload.** One replica with the deployment defaults (serve_app/config.yaml: 32 in flight,
   64 queued per proxy, 503 + Retry-After beyond), `--uploads` requests from `--overload-c` (256)
   concurrent clients with a 30 s client timeout: counts of 200 / 503 (with `Retry-After`) /
   anything else / client failures, p50/p99 of each, and the replica's RSS before and at peak.
   Expect 503s, nothing else, p99 of the answered <= 5 s, bounded memory. Beside it, the floor:
   the same client against a Serve app with no model and the same queue limits (ratio printed).
2. **Isolation.** The same replica with an API key: a `/readyz` flood (c=64, no key), 8 concurrent
   `explain=true` requests and c=16 scoring, for `--seconds`: the probe's latency (p50/p99), every
   code, and whether a replica was restarted (its actor and process before and after).
3. **Replica kill.** Two replicas under steady load (c=8); after a third of the time one replica's
   actor is killed (`ray.kill`, as an OOM kill or a lost node would); Serve starts a replacement.
   Counts the requests that did not get a 200 (target: under 1%).

Real Ray Serve on this machine, real HTTP on loopback, the default ensemble bundle built here
(`bench_serve.make_bundle`) on the ONNX Runtime engine; inputs are real X-rays from ../shared/data
(synthetic JPEGs when absent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import free_port, load_images, make_bundle, wait_http  # noqa: E402


def _why(r) -> str:  # noqa: ANN001
    """Who answered a non-200: the app (its error kind) or Serve's proxy (backpressure, timeout)."""
    try:
        err = r.json()["error"]
        return f"{r.status_code} app:{err['kind'] if isinstance(err, dict) else 'v2'}"
    except Exception:  # noqa: BLE001 - not our JSON: Serve's own answer (backpressure, timeout)
        return f"{r.status_code} serve:{r.text[:40]}"


async def _drive(url: str, images: list[bytes], concurrency: int, seconds: float | None = None,
                 total: int | None = None, timeout: float = 60, method: str = "POST",
                 headers: dict | None = None, params: dict | None = None) -> list[tuple]:
    """(status or -1 for a client failure, latency ms, Retry-After present) per request; until
    `seconds` have passed or `total` requests were sent."""
    import httpx

    out: list[tuple] = []
    end = time.perf_counter() + seconds if seconds else None
    issued = [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker(k: int) -> None:
            while (end is None or time.perf_counter() < end) and (total is None or issued[0] < total):
                i = issued[0]
                issued[0] += 1
                t0 = time.perf_counter()
                try:
                    if method == "GET":
                        r = await client.get(url, headers=headers)
                    else:
                        r = await client.post(url, content=images[i % len(images)], params=params,
                                              headers={"content-type": "image/jpeg", **(headers or {})})
                    in_replica = r.json().get("latency_ms") if r.status_code == 200 and method == "POST" else None
                    out.append((r.status_code, (time.perf_counter() - t0) * 1000, "retry-after" in r.headers,
                                "" if r.status_code == 200 else _why(r), in_replica))
                except httpx.HTTPError as exc:
                    out.append((-1, (time.perf_counter() - t0) * 1000, False, f"client:{type(exc).__name__}", None))

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return out


def summarise(rows: list[tuple]) -> dict:
    why: dict[str, int] = {}
    for *_, w, _ in rows:
        if w:
            why[w] = why.get(w, 0) + 1
    codes: dict[str, int] = {}
    for code, *_ in rows:
        codes[str(code)] = codes.get(str(code), 0) + 1
    res = {"requests": len(rows), "codes": codes}
    for code in (200, 503, -1):
        lat = np.array([ms for c, ms, *_ in rows if c == code])
        if len(lat):
            res[f"{code}_p50_ms"] = round(float(np.percentile(lat, 50)), 1)
            res[f"{code}_p99_ms"] = round(float(np.percentile(lat, 99)), 1)
    res["503_with_retry_after"] = sum(1 for c, _, ra, *_ in rows if c == 503 and ra)
    inside = np.array([r[4] for r in rows if r[4] is not None])
    if len(inside):  # the replica's own time for the answered (the rest: proxy, client, the loaded CPU)
        res["200_in_replica_p50_ms"] = round(float(np.percentile(inside, 50)), 1)
        res["200_in_replica_p99_ms"] = round(float(np.percentile(inside, 99)), 1)
    res["not_200"] = len(rows) - codes.get("200", 0)
    res["not_200_rate"] = round(res["not_200"] / max(1, len(rows)), 4)
    res["answered_by"] = why
    return res


def replica_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ServeReplica:pneumo" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def replica_actors() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA::pneumo#PneumoService" in a["name"])


def replica_rss_mb() -> float:
    """The largest resident set of this app's replica processes (from /proc; Ray names them)."""
    rss = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if b"ServeReplica:pneumo" not in (proc / "cmdline").read_bytes():
                continue
            line = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("VmRSS:"))
            rss = max(rss, int(line.split()[1]) / 1024)
        except (OSError, StopIteration, ValueError):
            continue
    return rss


class PeakRSS:
    """The replica's RSS before, and its peak while the block runs (polled every 0.2 s)."""

    def __enter__(self) -> PeakRSS:
        self.before, self.peak, self._stop = replica_rss_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, replica_rss_mb())
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = replica_rss_mb()

    def figures(self) -> dict:
        return {"replica_rss_mb_before": round(self.before), "replica_rss_mb_peak": round(self.peak),
                "replica_rss_mb_after": round(self.after)}


def overload(base: str, images: list[bytes], a: argparse.Namespace) -> dict:
    with PeakRSS() as rss:
        rows = asyncio.run(_drive(base + "/v1/predict", images, a.overload_c, total=a.uploads, timeout=30))
    out = summarise(rows)
    out.update(rss.figures(), loadavg_1m=round(os.getloadavg()[0], 1))
    return out


def overload_floor(base: str, images: list[bytes], a: argparse.Namespace) -> dict:
    """The baseline: the same client against a Serve app that reads the body and answers at once
    (no model), with pneumo's queue limits: what Serve's proxy and the client cost on this machine."""
    from ray import serve
    from starlette.responses import JSONResponse

    from pneumo.serve.config import DEPLOYMENT_DEFAULTS

    @serve.deployment(max_ongoing_requests=DEPLOYMENT_DEFAULTS["max_ongoing_requests"],
                      max_queued_requests=DEPLOYMENT_DEFAULTS["max_queued_requests"],
                      backpressure_config=DEPLOYMENT_DEFAULTS["backpressure_config"])
    class NoModel:
        async def __call__(self, request):  # noqa: ANN001, ANN204
            await request.body()
            return JSONResponse({"latency_ms": 0.0})

    serve.run(NoModel.bind(), name="pneumo", route_prefix="/")
    wait_http(base + "/v1/predict")
    out = summarise(asyncio.run(_drive(base + "/v1/predict", images, a.overload_c, total=a.uploads, timeout=30)))
    out.update(loadavg_1m=round(os.getloadavg()[0], 1))
    return out


def isolation(base: str, images: list[bytes], key: str, seconds: float) -> dict:
    """/readyz flood (c=64, no key) + 8 explain=true + c=16 scoring, all at once."""
    auth = {"authorization": f"Bearer {key}"}
    actors, pids = replica_actors(), replica_pids()

    async def all_at_once() -> list[list]:
        return await asyncio.gather(
            _drive(base + "/readyz", images, 64, seconds=seconds, method="GET", timeout=30),
            _drive(base + "/v1/predict", images, 8, seconds=seconds, params={"explain": "true"}, headers=auth),
            _drive(base + "/v1/predict", images, 16, seconds=seconds, headers=auth))

    health_ms: list[float] = []
    stop = threading.Event()

    def serve_health_probe() -> None:
        """The call Serve's controller makes every health_check_period_s, timed (on the replica actor)."""
        import ray

        actor = ray.get_actor(actors[0], namespace="serve")
        while not stop.is_set():
            t0 = time.perf_counter()
            ray.get(actor.check_health.remote(), timeout=60)
            health_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.5)

    prober = threading.Thread(target=serve_health_probe, daemon=True)
    with PeakRSS() as rss:
        prober.start()
        probes, explain, scoring = asyncio.run(all_at_once())
        stop.set()
        prober.join(timeout=120)
    import httpx

    info = httpx.get(base + "/v1/model", headers=auth, timeout=30).json()
    restarted = replica_actors() != actors or replica_pids() != pids
    lat = np.array(health_ms)
    check = {"calls": len(lat), "p50_ms": round(float(np.percentile(lat, 50)), 1),
             "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(lat.max()), 1)}
    return {"check_health": check, "readyz": summarise(probes), "explain": summarise(explain),
            "scoring": summarise(scoring),
            "replica_restarted": restarted, "probes_run": info["replica"]["probes"],
            "explain_refused": info["replica"]["pools"]["explain"]["refused"], **rss.figures(),
            "loadavg_1m": round(os.getloadavg()[0], 1)}


def replica_kill(base: str, images: list[bytes], bundle: str, seconds: float) -> dict:
    import ray
    from ray import serve

    from pneumo.serve.app import ServeArgs, bind

    two = {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}
    serve.run(bind(ServeArgs(bundle=bundle), autoscaling_config=two, ray_actor_options={"num_cpus": 1}),
              name="pneumo", route_prefix="/")
    wait_http(base + "/readyz")
    names = replica_actors()
    killed: dict = {}

    def kill_one() -> None:
        time.sleep(seconds / 3)
        victim = names[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed.update(name=victim.rsplit("#", 1)[-1], at_s=round(seconds / 3, 1))

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    kill = summarise(asyncio.run(_drive(base + "/v1/predict", images, 8, seconds=seconds)))
    killer.join()
    kill.update(killed=killed, replicas_after=len(replica_actors()))
    return kill


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--uploads", type=int, default=1024)
    ap.add_argument("--overload-c", type=int, default=256)
    ap.add_argument("--model", default="efficientnet_lite_ensemble")
    ap.add_argument("--bundle", help="a bundle to serve (default: --model built into a temp dir)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: overload, isolation, kill")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    from pneumo.serve.app import ServeArgs, bind

    skip = set(filter(None, a.skip.split(",")))
    tmp = tempfile.TemporaryDirectory(prefix="bench_rel_")
    bundle = a.bundle or make_bundle(Path(tmp.name) / "bundle", a.model)
    key_file = Path(tmp.name) / "api_key"
    key_file.write_text("bench-key\n")
    images, source = load_images(64)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    base = f"http://127.0.0.1:{port}"
    result: dict = {"inputs": source, "model": a.model}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    try:
        one = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        serve.run(bind(ServeArgs(bundle=bundle), autoscaling_config=one, ray_actor_options={"num_cpus": 2}), name="pneumo", route_prefix="/")
        wait_http(base + "/readyz")
        if "overload" not in skip:
            result["overload"] = overload(base, images, a)
            print(f"overload (c={a.overload_c}, {a.uploads} uploads, 1 replica, deployment defaults):",
                  json.dumps(result["overload"]), flush=True)
            result["overload_floor"] = floor = overload_floor(base, images, a)
            print("overload floor (the same client, a Serve app with no model):", json.dumps(floor), flush=True)
            p99, floor_p99 = result["overload"].get("200_p99_ms"), floor.get("200_p99_ms")
            if p99 and floor_p99:
                print(f"p99 of the answered: pneumo {p99 / 1000:.1f} s, no-model floor {floor_p99 / 1000:.1f} s "
                      f"(ratio {p99 / floor_p99:.2f}x; target 5 s)", flush=True)
        if "isolation" not in skip:
            serve.delete("pneumo")
            serve.run(bind(ServeArgs(bundle=bundle, api_key_file=str(key_file)), autoscaling_config=one,
                           ray_actor_options={"num_cpus": 2}), name="pneumo", route_prefix="/")
            wait_http(base + "/readyz")
            result["isolation"] = isolation(base, images, "bench-key", a.seconds)
            print("isolation (/readyz c=64 no key + 8 explain + c=16 scoring):", json.dumps(result["isolation"]),
                  flush=True)
        if "kill" not in skip:
            serve.delete("pneumo")
            result["replica_kill"] = replica_kill(base, images, bundle, a.seconds)
            print("replica kill (c=8, 2 replicas, one killed):", json.dumps(result["replica_kill"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
