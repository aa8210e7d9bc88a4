"""Serving under stress: overload far beyond capacity, and a replica killed under load.

    .venv/bin/python benchmarks/bench_reliability.py [--seconds 30] [--json OUT]

1. **Overload.** One replica (1 request in flight, a queue of 4 per proxy), driven at
   concurrency 64 (far beyond what one 2-core replica scores) for `--seconds`: counts of 200 /
   503 (with `Retry-After`) / anything else, p50/p99 of each, and the replica process's peak RSS.
   Expect 503s, no 500s, a bounded p99 for the answered requests and bounded memory.
2. **Replica kill.** Two replicas under steady load (concurrency 8); after a third of the time
   one replica's actor is killed (`ray.kill`, as an OOM kill or a lost node would); Serve starts
   a replacement. Counts the requests that did not get a 200 (target: under 1%).

Real Ray Serve on this machine, real HTTP on loopback, the efficientnet_lite0 bundle (packaged
weights) on the ONNX Runtime engine; inputs are real X-rays from ../shared/data (synthetic
JPEGs when absent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import free_port, load_images, make_bundle, wait_http  # noqa: E402


async def _drive(url: str, images: list[bytes], concurrency: int, seconds: float) -> list[tuple[int, float, bool]]:
    import httpx

    out: list[tuple[int, float, bool]] = []
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=images[i % len(images)], headers={"content-type": "image/jpeg"})
                    out.append((r.status_code, (time.perf_counter() - t0) * 1000, "retry-after" in r.headers))
                except httpx.HTTPError:
                    out.append((-1, (time.perf_counter() - t0) * 1000, False))
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return out


def summarise(rows: list[tuple[int, float, bool]]) -> dict:
    codes: dict[str, int] = {}
    for code, _, _ in rows:
        codes[str(code)] = codes.get(str(code), 0) + 1
    res = {"requests": len(rows), "codes": codes}
    for code in (200, 503):
        lat = np.array([ms for c, ms, _ in rows if c == code])
        if len(lat):
            res[f"{code}_p50_ms"] = round(float(np.percentile(lat, 50)), 1)
            res[f"{code}_p99_ms"] = round(float(np.percentile(lat, 99)), 1)
    res["503_with_retry_after"] = sum(1 for c, _, ra in rows if c == 503 and ra)
    res["not_200"] = len(rows) - codes.get("200", 0)
    res["not_200_rate"] = round(res["not_200"] / max(1, len(rows)), 4)
    return res


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    from pneumo.serve.app import ServeArgs, bind

    tmp = tempfile.TemporaryDirectory(prefix="bench_rel_")
    bundle = make_bundle(Path(tmp.name) / "bundle")
    images, source = load_images(64)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    base = f"http://127.0.0.1:{port}"
    result: dict = {"inputs": source}
    try:
        one = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
        serve.run(bind(ServeArgs(bundle=bundle, request_timeout_s=10), autoscaling_config=one,
                       max_ongoing_requests=1, max_queued_requests=4, ray_actor_options={"num_cpus": 2}),
                  name="pneumo", route_prefix="/")
        wait_http(base + "/readyz")
        peak = [0.0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], replica_rss_mb())
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rss_before = replica_rss_mb()
        over = summarise(asyncio.run(_drive(base + "/v1/predict", images, 64, a.seconds)))
        stop.set()
        watcher.join()
        over.update(replica_rss_mb_before=round(rss_before), replica_rss_mb_peak=round(peak[0]))
        result["overload"] = over
        print("overload (c=64, 1 replica, 1 in flight, queue 4):", json.dumps(over), flush=True)

        serve.delete("pneumo")
        two = {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}
        serve.run(bind(ServeArgs(bundle=bundle), autoscaling_config=two, ray_actor_options={"num_cpus": 1}),
                  name="pneumo", route_prefix="/")
        wait_http(base + "/readyz")
        names = replica_actors()
        killed: dict = {}

        def kill_one() -> None:
            time.sleep(a.seconds / 3)
            victim = names[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed.update(name=victim.rsplit("#", 1)[-1], at_s=round(a.seconds / 3, 1))

        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
        kill = summarise(asyncio.run(_drive(base + "/v1/predict", images, 8, a.seconds)))
        killer.join()
        kill.update(killed=killed, replicas_after=len(replica_actors()))
        result["replica_kill"] = kill
        print("replica kill (c=8, 2 replicas, one killed):", json.dumps(kill), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
