"""Nightly scoring at archive scale: `pneumo score --incremental` on an archive of N entries of which 1%
changed, against scoring that 1% alone (the floor), at two archive sizes (driver memory per entry).

    nice -n 10 .venv/bin/python benchmarks/bench_incremental.py --sizes 100000,1000000
    .venv/bin/python benchmarks/bench_incremental.py --sizes 20000,100000      # quicker

The archive: a symlink farm (`farm<N>/dNNNN/iNNNNNNN.jpeg`, 1,000 entries a folder) over copies of
the real 224 px X-rays (`../shared/data/chest_xray_224`, 5,216 files, copied once to `sources/src/` so
the links are short enough to live in their inodes). Last night's table is seeded with one committed
row per entry, fingerprinted from the listing with this bundle (scoring a million images first
would take hours on 2 cores; the incremental run cannot tell the difference). Then 1% of the
entries are re-pointed at other X-rays (`src_new/`), which is what a changed file looks like.

Each run is a real `pneumo score` process with its own embedded Ray (as cron would start it). Per
run: wall time; files opened under `src/` (unchanged content: must be 0) and `src_new/` (the changed
1%), counted with inotify (`tests/helpers.OpenWatch`), which sees every process; the driver's peak
RSS (`VmHWM` of the `pneumo` process, sampled; the object store and Ray's daemons are other
processes). Model: the tests' tiny seed_cnn at 64 px, so the incremental machinery's own cost
shows (a real model makes the 1% floor slower and the ratio better). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import OpenWatch, make_threshold_bundle  # noqa: E402

PNEUMO = str(Path(sys.executable).parent / "pneumo")
FAST = ["--batch-size", "64", "--read-batch-size", "64"]


def shared_root() -> Path:
    return Path(os.environ.get("PNEUMO_SHARED_DATA") or REPO.parent / "shared" / "data")


def sources(work: Path) -> tuple[list[str], list[str]]:
    """`src/` and `src_new/`: the real 224 px X-rays copied once, split in two (relative names)."""
    images = sorted((shared_root() / "chest_xray_224").rglob("*.jpeg"))
    if not images:
        sys.exit(f"real data not found under {shared_root()} (set PNEUMO_SHARED_DATA)")
    out: dict[str, list[str]] = {"src": [], "src_new": []}
    for i, path in enumerate(images):
        folder = "src" if i % 2 == 0 else "src_new"
        target = work / "sources" / folder / f"{i:05d}.jpeg"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        out[folder].append(f"{folder}/{i:05d}.jpeg")
    return out["src"], out["src_new"]


def entry(farm: Path, i: int) -> Path:
    return farm / f"d{i // 1000:04d}" / f"i{i:07d}.jpeg"


def build_farm(work: Path, n: int, old: list[str]) -> Path:
    farm = work / f"farm{n}"
    if not (farm / ".complete").exists():
        shutil.rmtree(farm, ignore_errors=True)
        for i in range(n):
            link = entry(farm, i)
            if i % 1000 == 0:
                link.parent.mkdir(parents=True)
            os.symlink(f"../../sources/{old[i % len(old)]}", link)
        (farm / ".complete").write_text("ok")
    return farm


def change(farm: Path, n: int, new: list[str], every: int = 100) -> list[int]:
    """Re-point 1% of the entries at other X-rays (the `src_new/` copies); their indices."""
    changed = list(range(7, n, every))
    for k, i in enumerate(changed):
        link = entry(farm, i)
        link.unlink()
        os.symlink(f"../../sources/{new[k % len(new)]}", link)
    return changed


def seed_table(farm: Path, bundle: Path, out: Path) -> float:
    """Last night's table: one committed row per entry, fingerprinted from the listing (module doc)."""
    code = f"""
import datetime as dt, pyarrow as pa, pyarrow.compute as pc, ray
from pneumo.bundle.manifest import read_manifest
from pneumo.config import parse_config
from pneumo.io.storage import Location
from pneumo.score import table as T
from pneumo.score.config import ScoreConfig
from pneumo.score.inputs import listing_dataset
from pneumo.score.parts import PartSink
from pneumo.score.tasks import OUTPUT_SCHEMA
ray.init(num_cpus={os.cpu_count()})
cfg = parse_config(ScoreConfig, [{str(farm)!r}, "--bundle", {str(bundle)!r}, "--out", {str(out)!r}])
m = read_manifest(cfg.bundle_location)
def rows(t):
    n = len(t)
    cols = {{c: t.column(c) for c in t.column_names}}
    cols.update(status=pa.array(["ok"] * n), label=pa.array(["NORMAL"] * n), probability=pa.array([0.1] * n),
                probabilities=pa.array([[0.9, 0.1]] * n), threshold=pa.array([m.threshold_value] * n),
                model=pa.array([m.model] * n), model_version=pa.array([m.version] * n),
                bundle_sha256=pa.array([m.sha256] * n), run_id=pa.array(["seed"] * n),
                scored_at=pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC")))
    return pa.table({{f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in OUTPUT_SCHEMA}}, schema=OUTPUT_SCHEMA)
_, listing = listing_dataset(cfg)
sink = PartSink(cfg.out_location, "seed", OUTPUT_SCHEMA)
listing.map_batches(rows, batch_format="pyarrow").write_datasink(sink)
T.commit(cfg.out_location, sink.parts, OUTPUT_SCHEMA, {{"run_id": "seed", "kind": "seed"}})
print(sum(p["rows"] for p in sink.parts))
"""
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bi", dir="/tmp")
    try:
        res = subprocess.run([sys.executable, "-c", code], env=_env(tmp), capture_output=True, text=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return time.perf_counter() - t0


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    return env


def _peak_rss(pid: int, stop: threading.Event, out: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out["hwm_kb"] = max(out.get("hwm_kb", 0), int(line.split()[1]))
        except OSError:
            return
        stop.wait(0.2)


def run(args: list[str], watch_root: Path) -> dict[str, object]:
    """One `pneumo score` process: wall, driver peak RSS, files opened under src/ and src_new/."""
    watch = OpenWatch(watch_root)
    tmp = tempfile.mkdtemp(prefix="bi", dir="/tmp")
    t0 = time.perf_counter()
    proc = subprocess.Popen([PNEUMO, "score", *args, *FAST], env=_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    rss: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, stop, rss), daemon=True)
    sampler.start()
    log = proc.communicate()[0]
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    subprocess.run(["pkill", "-9", "-f", tmp], check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    opened = watch.poll()
    watch.close()
    assert proc.returncode == 0, log[-3000:]
    summary = [line for line in log.splitlines() if line.startswith(("run ", "  files", "  ok", "  wall"))]
    return {"wall_s": round(wall, 1), "driver_peak_rss_mb": round(rss.get("hwm_kb", 0) / 1024, 1),
            "opened_unchanged": sum(v for k, v in opened.items() if k.startswith("src/")),
            "opened_changed": sum(v for k, v in opened.items() if k.startswith("src_new/")), "summary": summary}


def bench_size(work: Path, bundle: Path, n: int, old: list[str], new: list[str]) -> dict[str, object]:
    farm = build_farm(work, n, old)
    out = work / f"table{n}"
    shutil.rmtree(out, ignore_errors=True)
    seed_s = seed_table(farm, bundle, out)
    changed = change(farm, n, new)
    floor_farm = work / f"changed{n}"
    shutil.rmtree(floor_farm, ignore_errors=True)
    for i in changed:  # the same 1%, alone
        link = floor_farm / entry(farm, i).relative_to(farm)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.readlink(entry(farm, i)), link)
    incremental = run([str(farm), "--bundle", str(bundle), "--out", str(out), "--incremental"], work / "sources")
    floor = run([str(floor_farm), "--bundle", str(bundle), "--out", str(work / f"floor{n}")], work / "sources")
    shutil.rmtree(work / f"floor{n}", ignore_errors=True)
    for i in changed:  # put the farm back for the next time
        entry(farm, i).unlink()
        os.symlink(f"../../sources/{old[i % len(old)]}", entry(farm, i))
    return {"entries": n, "changed": len(changed), "seed_table_s": round(seed_s, 1), "incremental": incremental,
            "floor": floor, "wall_ratio": round(incremental["wall_s"] / floor["wall_s"], 2)}


def machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    return {"cpu": model, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--work", default="/tmp/pneumo_bench_incremental")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old, new = sources(work)
    bundle = make_threshold_bundle(work / "bundle") if not (work / "bundle" / "b").exists() else work / "bundle" / "b"
    report = {"machine": machine(), "results": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        report["results"].append(bench_size(work, bundle, n, old, new))
        print(json.dumps(report["results"][-1], indent=1), flush=True)
    small, large = report["results"][0], report["results"][-1]
    d_rss = large["incremental"]["driver_peak_rss_mb"] - small["incremental"]["driver_peak_rss_mb"]
    per_entry = d_rss * 2**20 / max(1, large["entries"] - small["entries"])
    report["driver_bytes_per_entry"] = round(per_entry, 1)
    report["rss_ratio_large_vs_small"] = round(large["incremental"]["driver_peak_rss_mb"]
                                               / small["incremental"]["driver_peak_rss_mb"], 2)
    report["extrapolated_10M_driver_mb"] = round(large["incremental"]["driver_peak_rss_mb"]
                                                 + per_entry * (10_000_000 - large["entries"]) / 2**20, 1)
    report["machine"]["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
