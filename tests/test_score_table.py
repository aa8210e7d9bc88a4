"""The scoring results table (Delta Lake) on the real local Ray, real files and the real weed S3 server:
any Delta reader sees exactly the committed rows, any earlier night is one call, two `pneumo score`
processes commit into one table at once, a huge file is a row, a failed run leaves nothing, run
ids are checked, late steps never cost a run its rows, and (on a GPU) Grad-CAM runs on the model's device.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from helpers import FAST_SCORE, OpenWatch, jpeg_bytes, make_serve_bundle, read_only, score

from pneumo.config import parse_config
from pneumo.io.storage import Location
from pneumo.score.config import ScoreConfig
from pneumo.score.driver import main as score_main
from pneumo.score.runs import committed_runs, read_committed, read_results, run_version

PNEUMO = str(Path(sys.executable).parent / "pneumo")


def _images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(seed + i, (64, 64), 190 if i % 2 else None))
    return [folder / n for n in names]


def _parts(out: Path) -> set[str]:
    return {p.name for p in out.glob("part-*.parquet")}


def test_pandas_polars_and_ray_read_exactly_the_committed_rows_and_any_earlier_night(
        ray_local, threshold_bundle, tmp_path) -> None:  # noqa: ANN001
    import polars as pl
    import ray
    from deltalake import DeltaTable

    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, [f"a{i}.jpeg" for i in range(3)])
    first = score(data, threshold_bundle, out, "--incremental")
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    _images(data, ["b0.jpeg", "b1.jpeg"], seed=10)
    second = score(data, threshold_bundle, out, "--incremental")
    committed = sorted(str(p) for p in data.glob("*.jpeg"))
    stray = next(iter(_parts(out)))  # a file no commit names, as a killed run leaves one
    shutil.copy(out / stray, out / f"part-{first.run_id}x-00000-0000.parquet")

    by_reader = {
        "pandas (deltalake)": DeltaTable(str(out)).to_pandas(),
        "polars": pl.read_delta(str(out)).to_pandas(),
        "ray.data.read_delta": ray.data.read_delta(str(out)).to_pandas(),
        "pneumo read_committed": read_committed(str(out)).to_pandas(),
    }
    for reader, df in by_reader.items():
        assert sorted(df.path) == committed, reader  # 5 rows: the stray file's copies are not seen
        assert Counter(df.run_id) == {first.run_id: 3, second.run_id: 2}, reader

    assert (first.version, second.version) == (0, 1) and run_version(str(out), second.run_id) == 1
    for earlier in (read_results(str(out), version=0), read_results(str(out), as_of=between)):
        assert sorted(earlier.path) == committed[:3] and set(earlier.run_id) == {first.run_id}
    assert len(read_results(str(out))) == 5
    runs = committed_runs(str(out))
    assert [(r["run_id"], r["version"], r["n_scored"]) for r in runs] == [(first.run_id, 0, 3), (second.run_id, 1, 2)]
    assert runs[1]["bundle_sha256"] == by_reader["polars"].bundle_sha256[0] and runs[1]["config"]["incremental"]


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_score_processes_into_one_table_at_once_lose_and_duplicate_nothing(
        where, threshold_bundle, s3_server, tmp_path) -> None:  # noqa: ANN001
    data = tmp_path / "data"
    inputs = _images(data, [f"x{i}.jpeg" for i in range(6)])
    args = [str(data), "--out", str(tmp_path / "out")]
    if where == "s3":
        s3_server.make_bucket("concurrent")
        s3_server.upload_dir(data, "concurrent", "in")
        args = ["s3://concurrent/in", "--out", "s3://concurrent/out", "--s3-endpoint", s3_server.endpoint]
    cmd = [PNEUMO, "score", *args, "--bundle", str(threshold_bundle), *FAST_SCORE, "--max-actors", "1"]
    ray_tmps = [tempfile.mkdtemp(prefix="pc", dir="/tmp") for _ in range(2)]  # Ray socket paths stay short
    procs = [subprocess.Popen(cmd, env=_env(t), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for t in ray_tmps]
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p, t in zip(procs, ray_tmps):
            if p.poll() is None:
                os.killpg(p.pid, 9)
            subprocess.run(["pkill", "-9", "-f", t], check=False)
            shutil.rmtree(t, ignore_errors=True)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    out = Location.resolve("s3://concurrent/out", s3_server.endpoint) if where == "s3" else Location.of(tmp_path / "out")
    runs = committed_runs(out)
    assert sorted(r["version"] for r in runs) == [0, 1]  # two commits, neither lost
    rows = read_committed(out).to_pandas()
    expected = sorted(f"s3://concurrent/in/{p.name}" for p in inputs) if where == "s3" else sorted(map(str, inputs))
    for run in runs:  # exactly one row per input per run
        assert sorted(rows[rows.run_id == run["run_id"]].path) == expected
    assert len(rows) == 2 * len(inputs)


def test_a_2gb_sparse_file_is_a_too_large_row_never_read_and_the_run_commits(ray_local, threshold_bundle, tmp_path) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, ["a.jpeg", "b.jpeg"])
    with open(data / "huge.dcm", "wb") as f:
        f.truncate(2 * 2**30)  # 2 GiB, sparse: no disk used
    watch = OpenWatch(data)
    result = score(data, threshold_bundle, out)
    opened = watch.poll()
    watch.close()
    assert result.version == 0 and result.counts == {"ok": 2, "error": 1} and result.errors == {"too_large": 1}
    row = read_results(str(out)).set_index("path").loc[str(data / "huge.dcm")]
    assert (row.status, row.error_kind, row.size_bytes) == ("error", "too_large", 2 * 2**30)
    assert "536,870,912-byte limit" in row.error and pd.isna(row.etag_or_sha256)
    assert "huge.dcm" not in opened and {"a.jpeg", "b.jpeg"} <= set(opened)  # refused from the listing alone


def test_a_run_that_cannot_commit_leaves_no_file_and_no_row(ray_local, threshold_bundle, tmp_path) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, ["a.jpeg"])
    score(data, threshold_bundle, out)
    before = _parts(out)
    _images(data, ["b.jpeg"], seed=5)
    with read_only(out / "_delta_log"), pytest.raises(Exception):  # noqa: B017 - whatever the store says
        score(data, threshold_bundle, out, "--incremental")
    assert _parts(out) == before  # the failed run deleted its own files
    assert sorted(read_results(str(out)).path) == [str(data / "a.jpeg")]


@pytest.mark.parametrize("run_id", ["/srv/x", "a/b", "..", "a b", "x;rm"])
def test_a_run_id_that_is_not_one_safe_name_is_refused(run_id: str, tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(ScoreConfig, [str(tmp_path), "--bundle", "b", "--out", str(tmp_path / "o"), "--run-id", run_id])
    assert exc.value.code == 2


def test_a_committed_run_id_is_refused_before_anything_runs(ray_local, threshold_bundle, tmp_path, capsys) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, ["a.jpeg"])
    score(data, threshold_bundle, out, "--run-id", "nightly-1")
    rc = score_main([str(data), "--bundle", str(threshold_bundle), "--out", str(out), "--run-id", "nightly-1"])
    assert rc == 2 and "is a committed run" in capsys.readouterr().err
    assert [r["run_id"] for r in committed_runs(str(out))] == ["nightly-1"]


def test_adapt_em_without_training_counts_fails_before_scoring(threshold_bundle, tmp_path, capsys) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, ["a.jpeg"])
    rc = score_main([str(data), "--bundle", str(threshold_bundle), "--out", str(out), "--adapt", "--adapt-methods", "em"])
    assert rc == 2 and "training class counts" in capsys.readouterr().err
    assert not out.exists()  # nothing scored, nothing written


def test_a_drift_plot_that_cannot_be_written_is_a_warning_not_a_lost_run(ray_local, tmp_path) -> None:  # noqa: ANN001
    bundle = tmp_path / "bundle"
    make_serve_bundle(bundle, seed=3, drift=True)
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, [f"x{i}.jpeg" for i in range(4)])
    (out / "_pneumo" / "runs" / "r1" / "drift.png").mkdir(parents=True)  # a folder where the plot goes
    result = score(data, bundle, out, "--run-id", "r1")
    assert result.version == 0 and result.counts["ok"] == 4 and len(read_results(str(out))) == 4
    assert len(result.warnings) == 1 and result.warnings[0].startswith("drift.png not written")
    (record,) = committed_runs(str(out))
    assert record["warnings"] == result.warnings and record["drift"]["status"] in ("too_few", "ok", "drift")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Grad-CAM on the model's GPU")
def test_explain_on_the_gpu_gives_positives_their_overlay(ray_local, threshold_bundle, tmp_path) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    _images(data, [f"x{i}.jpeg" for i in range(4)])
    result = score(data, threshold_bundle, out, "--explain", "--engine", "torch", "--gpus-per-actor", "1")
    rows = read_results(str(out))
    positives = rows[rows.label == "PNEUMONIA"]
    assert len(positives) >= 1 and result.counts["error"] == 0 and positives.explain_error.isna().all()
    assert all(Path(p).is_file() for p in positives.explain_path)


def test_verify_content_rescores_a_file_whose_bytes_changed_under_an_unchanged_listing(tmp_path) -> None:
    from pneumo.score.incremental import changed_files

    (tmp_path / "a.jpeg").write_bytes(b"now")
    import hashlib

    batch = pa.table({"path": [str(tmp_path / "a.jpeg")] * 2, "size_bytes": [3, 3], "mtime_ns": [1, 1],
                      "ctime_ns": [1, 1], "inode": [1, 1], "etag": pa.array([None, None], pa.string()),
                      "committed_sha256": [hashlib.sha256(b"now").hexdigest(), hashlib.sha256(b"then").hexdigest()]})
    changed = changed_files(batch, Location.of(tmp_path))
    assert changed.num_rows == 1 and changed.column_names == ["path", "size_bytes", "mtime_ns", "ctime_ns", "inode", "etag"]


@pytest.mark.parametrize("limit", [10_000, 25])
def test_the_drift_sample_holds_only_ok_rows_all_of_them_up_to_its_limit(ray_local, tmp_path, limit: int) -> None:  # noqa: ANN001
    """`ok_sample` reads the run's files: every ok row (and no error row) when they fit the limit
    (read in the driver), a uniform sample of about `limit` when they do not (Ray Data's tasks)."""
    import pyarrow.parquet as pq

    from pneumo.score.parts import ok_sample

    parts = []
    for k in range(3):
        status = ["ok"] * 30 + ["error"] * 5
        pq.write_table(pa.table({"status": status, "probability": [0.01 * i for i in range(35)],
                                 "embedding": [[float(k), float(i)] for i in range(35)]}), tmp_path / f"p{k}.parquet")
        parts.append({"path": f"p{k}.parquet"})
    sample = ok_sample(Location.of(str(tmp_path)), parts, ["probability", "embedding"], n_ok=90, limit=limit)
    assert set(sample.column("status").to_pylist()) == {"ok"}
    if limit >= 90:
        assert sample.num_rows == 90 and sorted({e[0] for e in sample.column("embedding").to_pylist()}) == [0.0, 1.0, 2.0]
    else:
        assert 5 <= sample.num_rows <= 60, sample.num_rows
