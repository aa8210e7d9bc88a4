"""Batch scoring (pneumo.score) on the real local Ray, real files and the real weed S3 server.

One scoring run of a mixed folder (module fixture) serves the row/status, explain and schema
tests; incremental, killed-run, old-format and S3 tests make their own small runs. Tiny bundle:
seed_cnn at 64 px, 1 channel, random weights. The table's own properties (readers, time travel,
concurrent runs, size cap, run ids) are in test_score_table.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable
from helpers import (
    OpenWatch,
    dicom_bytes,
    jpeg_bytes,
    png_bytes,
    read_only,
    score,
    write_legacy_run,
)
from PIL import Image

from pneumo.io.storage import Location
from pneumo.score.runs import committed_runs, read_committed, read_results
from pneumo.score.tasks import OUTPUT_SCHEMA

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size: tuple[int, int] = (80, 96), level: int | None = None) -> bytes:
    return jpeg_bytes(seed, size, level)


def _png(seed: int, level: int | None = None) -> bytes:
    return png_bytes(seed, (70, 70), level)


def _nn(value):  # noqa: ANN001, ANN202 - pandas reads a null string as None or NaN
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


@pytest.fixture(scope="module")
def bundle(threshold_bundle: Path) -> Path:
    """conftest's `threshold_bundle`: a random seed_cnn whose threshold splits bright from dark images."""
    return threshold_bundle


# ---------------------------------------------------------------- one mixed run (rows, explain, schema)

EXPECTED = {  # relative path -> (status, error_kind)
    "a/b/c/good1.jpeg": ("ok", None),
    "a/b/good2.jpg": ("ok", None),
    "a/dark.jpeg": ("ok", None),
    "a/bright.jpeg": ("ok", None),
    "good3.png": ("ok", None),
    "bright.png": ("ok", None),
    "scan.dcm": ("ok", None),
    "corrupt.jpeg": ("error", "corrupt"),
    "empty.png": ("error", "empty"),
    "notes.jpeg": ("error", "unsupported"),
    "truncated.jpeg": ("error", "corrupt"),
    "broken.dcm": ("error", "corrupt"),
    "readme.txt": ("error", "unsupported"),
}


@pytest.fixture(scope="module")
def mixed_run(ray_local, bundle, tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    good = _jpeg(1)
    files = {
        "a/b/c/good1.jpeg": good,
        "a/b/good2.jpg": _jpeg(2),
        "a/dark.jpeg": _jpeg(3, level=0),
        "a/bright.jpeg": _jpeg(4, level=190),
        "good3.png": _png(5),
        "bright.png": _png(6, level=190),
        "scan.dcm": dicom_bytes((np.arange(60 * 50).reshape(60, 50) % 4096).astype(np.uint16)),
        "corrupt.jpeg": b"\xff\xd8\xff" + bytes(range(256)) * 4,
        "empty.png": b"",
        "notes.jpeg": b"patient notes, not an image\n",
        "truncated.jpeg": good[: len(good) // 2],
        "broken.dcm": b"\0" * 128 + b"DICM" + b"\x01\x02" * 100,
        "readme.txt": b"listed: every entry is a row (unsupported)",
    }
    for rel, blob in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(blob)
    out = root / "out"
    result = score(data, bundle, out, "--explain")
    return {"data": data, "out": out, "result": result, "df": read_results(str(out))}


def test_mixed_inputs_give_one_row_each_with_status(mixed_run) -> None:  # noqa: ANN001
    df, data, result = mixed_run["df"], mixed_run["data"], mixed_run["result"]
    got = {str(Path(p).relative_to(data)): (s, _nn(k)) for p, s, k in zip(df.path, df.status, df.error_kind)}
    assert got == EXPECTED  # exactly one row per file, readme.txt included
    ok, err = df[df.status == "ok"], df[df.status == "error"]
    assert ok.probability.between(0, 1).all() and ok.label.isin(["NORMAL", "PNEUMONIA"]).all()
    assert all(len(v) == 2 and abs(sum(v) - 1) < 1e-5 for v in ok.probabilities)
    assert np.allclose([v[1] for v in ok.probabilities], ok.probability)
    assert err.probability.isna().all() and err.label.isna().all() and err.error.str.len().gt(0).all()
    assert err.etag_or_sha256.str.len().eq(64).all()  # read and hashed, then refused by the decoder
    good = (data / "a/b/c/good1.jpeg").read_bytes()
    row = df[df.path.str.endswith("good1.jpeg")].iloc[0]
    assert row.etag_or_sha256 == hashlib.sha256(good).hexdigest() and row.size_bytes == len(good)
    assert (df.run_id == result.run_id).all() and df.bundle_sha256.str.len().eq(64).all()
    assert (df.inode > 0).all() and (df.ctime_ns > 0).all() and df.etag.isna().all()  # the local fingerprint
    (record,) = committed_runs(str(mixed_run["out"]))  # the run's record is its commit's metadata
    assert record["counts"] == {"ok": 7, "error": 6} and record["n_scored"] == 13 and record["version"] == 0
    assert sorted(record["files"]) == sorted(Path(u).name for u in DeltaTable(str(mixed_run["out"])).file_uris())


def test_explain_writes_overlays_for_positives_only(mixed_run) -> None:  # noqa: ANN001
    df = mixed_run["df"]
    pos = df[df.label == "PNEUMONIA"]
    neg = df[df.label != "PNEUMONIA"]
    assert len(pos) >= 1 and (df.label == "NORMAL").sum() >= 1, "bundle threshold should split the images"
    assert neg.explain_path.isna().all()
    for path in pos.explain_path:
        assert "/explain/" in path and Path(path).is_file()
        img = Image.open(path)
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
    assert len(list((Path(mixed_run["result"].run_dir) / "explain").glob("*.png"))) == len(pos)


def _readme_schema() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- schema: scoring -->(.*?)<!-- /schema -->", text, re.S)
    assert m, "README must hold the scoring output schema between <!-- schema: scoring --> markers"
    rows = re.findall(r"^\|\s*`([a-z_0-9]+)`\s*\|\s*`([^`]+)`\s*\|", m.group(1), re.M)
    return dict(rows)


def test_output_schema_matches_readme(mixed_run) -> None:  # noqa: ANN001
    documented = _readme_schema()
    table = DeltaTable(str(mixed_run["out"])).to_pyarrow_table()  # what a Delta reader gets
    written = {f.name: str(f.type) for f in table.schema}
    assert list(documented) == list(written), "README columns (and their order) differ from the table"
    assert documented == written
    assert list(written) == OUTPUT_SCHEMA.names


# ---------------------------------------------------------------- incremental and killed runs


def test_incremental_rerun_scores_only_new_or_changed_files(ray_local, bundle, tmp_path) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for i in range(4):
        (data / f"x{i}.jpeg").write_bytes(_jpeg(10 + i))
    (data / "bad.jpeg").write_bytes(b"nope")
    first = score(data, bundle, out, "--incremental")
    assert (first.n_scored, first.n_skipped) == (5, 0)

    (data / "new1.png").write_bytes(_png(20))
    (data / "sub").mkdir()
    (data / "sub" / "new2.jpeg").write_bytes(_jpeg(21))
    (data / "x0.jpeg").write_bytes(_jpeg(99, size=(90, 90)))  # changed content and size
    second = score(data, bundle, out, "--incremental")
    assert (second.n_listed, second.n_scored, second.n_skipped) == (7, 3, 4)
    rows = read_committed(str(out)).to_pandas()
    second_paths = set(rows[rows.run_id == second.run_id].path)
    assert second_paths == {str(data / "new1.png"), str(data / "sub" / "new2.jpeg"), str(data / "x0.jpeg")}

    third = score(data, bundle, out, "--incremental")
    assert third.n_scored == 0 and third.n_skipped == 7
    latest = read_results(str(out))
    assert len(latest) == 7 and latest.path.is_unique
    assert latest.set_index("path").loc[str(data / "x0.jpeg"), "run_id"] == second.run_id


def test_killed_run_is_ignored_and_rerun_completes_without_duplicates(ray_local, bundle, tmp_path) -> None:  # noqa: ANN001
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for i in range(3):
        (data / f"old{i}.jpeg").write_bytes(_jpeg(30 + i))
    first = score(data, bundle, out, "--incremental")
    for i in range(4):
        (data / f"new{i}.jpeg").write_bytes(_jpeg(40 + i))

    # What a run killed after writing its files but before its commit leaves (the worst moment) ...
    (committed_file,) = [Path(u).name for u in DeltaTable(str(out)).file_uris()]
    shutil.copy(out / committed_file, out / "part-20000101T000000Z-dead00-00000-aaaa.parquet")
    # ... and one killed while writing a file (torn, at a name a write task could use).
    (out / "part-20000101T000000Z-dead01-00000-bbbb.parquet").write_bytes(b"PAR1 torn")
    (out / "_pneumo" / "runs" / "20000101T000000Z-dead01").mkdir(parents=True)
    assert [m["run_id"] for m in committed_runs(str(out))] == [first.run_id]
    assert len(read_results(str(out))) == 3  # readers see committed runs only

    rerun = score(data, bundle, out, "--incremental")
    assert rerun.n_scored == 4 and rerun.n_skipped == 3  # the killed run's files are scored again
    rows = read_committed(str(out)).to_pandas()
    assert sorted(rows.path) == sorted(str(p) for p in data.glob("*.jpeg"))  # every file once: none lost, no dups
    assert set(rows.run_id) == {first.run_id, rerun.run_id}


def test_old_parquet_runs_are_upgraded_into_the_table_and_damaged_ones_rescored(
        ray_local, bundle, tmp_path, caplog) -> None:  # noqa: ANN001
    """Run folders of the format before the table (`runs/<id>/part-*.parquet` + `_SUCCESS.json`) read
    as they are, then become the table's first commit; damaged ones are skipped with a warning and
    their files scored again; the good one's unchanged files are skipped from the listing alone."""
    data, out = _folder(tmp_path, {})
    scratch = tmp_path / "scratch"
    runs = []
    for k, group in enumerate(("good", "torn", "gone", "garbage")):  # four old runs, two files each
        for i in range(2):
            (data / f"{group}{i}.jpeg").write_bytes(_jpeg(60 + 2 * k + i))
        scored = score(data, bundle, scratch / group)
        rows = read_committed(str(scratch / group))
        rows = rows.filter(pc.starts_with(rows.column("path"), str(data / group)))
        runs.append(write_legacy_run(out, scored.run_id, rows, f"2020-01-0{k + 1}T00:00:00.000+00:00"))
    good, torn, gone, garbage = runs
    marker = (torn / "_SUCCESS.json").read_text()
    (torn / "_SUCCESS.json").write_text(marker[: len(marker) // 2])  # truncated JSON
    next(gone.glob("part-*.parquet")).unlink()  # the marker names a deleted part
    next(garbage.glob("part-*.parquet")).write_bytes(b"PAR1 not a parquet file")  # ... an unreadable one

    bad: list = []
    with caplog.at_level("WARNING", logger="pneumo.score.runs"):
        before = read_results(str(out))  # no table yet: the old runs read as they are
        assert [m["run_id"] for m in committed_runs(str(out), bad=bad)] == [good.name]
    assert sorted(before.path) == [str(data / f"good{i}.jpeg") for i in range(2)]
    assert sorted(b.run_id for b in bad) == sorted(r.name for r in runs[1:])
    lines = [r.getMessage() for r in caplog.records if r.name == "pneumo.score.runs"]
    assert lines and all(line.startswith("ignoring run ") for line in lines)
    assert not any(f"{g}{i}.jpeg" in line for line in lines for g in ("torn", "gone", "garbage") for i in (0, 1))

    watch = OpenWatch(data)
    rerun = score(data, bundle, out, "--incremental")  # upgrades, then scores the damaged runs' files
    opened = watch.poll()
    watch.close()
    assert (rerun.n_scored, rerun.n_skipped) == (6, 2)
    assert sorted(b["run_id"] for b in rerun.ignored_runs) == sorted(r.name for r in runs[1:])
    assert [m["run_id"] for m in committed_runs(str(out))] == [good.name, rerun.run_id]
    assert committed_runs(str(out))[0]["upgraded_from"] == f"runs/{good.name}"
    rows = read_committed(str(out)).to_pandas()
    assert sorted(rows.path) == sorted(str(p) for p in data.glob("*.jpeg"))  # every file once
    # the upgrade read the good run's files once, to prove them unchanged; the run itself did not
    assert all(opened[f"good{i}.jpeg"] == 1 for i in range(2)) and opened["torn0.jpeg"] >= 1, opened


def _folder(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """`tmp_path/data` holding `files`, and the output folder `tmp_path/out`."""
    data = tmp_path / "data"
    data.mkdir()
    for name, blob in files.items():
        (data / name).write_bytes(blob)
    return data, tmp_path / "out"


def test_a_same_size_cp_p_replacement_is_rescored_without_reading_unchanged_files(
        ray_local, bundle, tmp_path) -> None:  # noqa: ANN001
    data, out = _folder(tmp_path, {f"x{i}.jpeg": _jpeg(70 + i) for i in range(4)})
    first = score(data, bundle, out, "--incremental")
    assert first.n_scored == 4

    target = data / "x1.jpeg"
    st = target.stat()
    old = target.read_bytes()
    new = _jpeg(77)[: len(old)].ljust(len(old), b"\0")  # same size, other bytes (like a re-export)
    assert new != old and len(new) == len(old)
    source = tmp_path / "export" / "x1.jpeg"
    source.parent.mkdir()
    source.write_bytes(new)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    subprocess.run(["cp", "-p", str(source), str(target)], check=True)  # the old mtime kept, same size
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    watch = OpenWatch(data)
    second = score(data, bundle, out, "--incremental")
    opened = watch.poll()
    assert (second.n_scored, second.n_skipped) == (1, 3)  # ctime (and the inode) tell the replacement
    assert set(opened) == {"x1.jpeg"}, opened  # not one unchanged file was read
    latest = read_results(str(out)).set_index("path")
    assert latest.loc[str(target), "run_id"] == second.run_id
    assert latest.loc[str(target), "etag_or_sha256"] == hashlib.sha256(new).hexdigest()
    assert len(read_committed(str(out))) == 5  # no duplicate rows for the skipped files

    third = score(data, bundle, out, "--incremental")
    assert (third.n_scored, third.n_skipped) == (0, 4) and set(watch.poll()) == {"x1.jpeg"}
    verified = score(data, bundle, out, "--incremental", "--verify-content")  # the old check, on request
    assert (verified.n_scored, verified.n_skipped, verified.n_verified) == (0, 4, 4)
    assert set(watch.poll()) == {f"x{i}.jpeg" for i in range(4)}  # ... reads every skipped file
    watch.close()


def test_overlays_that_cannot_be_written_keep_every_label_and_long_names_fit(ray_local, bundle, tmp_path) -> None:  # noqa: ANN001
    long = "p" * 245  # + ".jpeg": a 250-character file name
    data, out = _folder(tmp_path, {f"{long}.jpeg": _jpeg(80, level=190), f"{long[:-1]}d.jpeg": _jpeg(81, level=0),
                                   "bright.jpeg": _jpeg(82, level=190), "dark.jpeg": _jpeg(83, level=0)})
    run_id = "20000101T000000Z-noexpl"
    with read_only(out / "_pneumo" / "runs" / run_id / "explain"):
        first = score(data, bundle, out, "--incremental", "--explain", "--run-id", run_id)
    rows = read_results(str(out))
    assert len(rows) == 4 and first.counts == {"ok": 4, "error": 0}  # the overlays failed, no row did
    failed = rows[rows.explain_error.notna()]
    assert len(failed) == 2 and (failed.label == "PNEUMONIA").all() and failed.probability.notna().all()
    assert failed.explain_path.isna().all() and failed.explain_error.str.startswith("Grad-CAM overlay not written").all()
    assert not failed.explain_error.str.contains("ppp").any()  # no file names in messages
    assert rows[rows.label == "NORMAL"].explain_error.isna().all()

    second = score(data, bundle, out, "--incremental", "--explain")  # a failed overlay is tried again
    assert (second.n_scored, second.n_skipped) == (2, 2)
    redone = read_results(str(out)).set_index("path").loc[list(failed.path)]
    assert (redone.status == "ok").all() and (redone.label == "PNEUMONIA").all() and redone.explain_error.isna().all()
    assert any(len(Path(p).name) == 250 for p in redone.index)  # a 250-character name got its overlay
    for path in redone.explain_path:
        assert Path(path).is_file() and len(Path(path).name) < 120


def test_a_model_failure_costs_only_the_failing_image(bundle) -> None:  # noqa: ANN001
    from pneumo.score.tasks import BundlePredictor

    actor = BundlePredictor(str(bundle), run_id="t")
    real = actor.predictor.predict_with_features

    def poisoned(images):  # noqa: ANN001, ANN202 - the engine fails on any batch holding image 2
        if (np.asarray(images) == 7).all(axis=(1, 2)).any():
            raise RuntimeError("engine error: bad input")
        return real(images)

    actor.predictor.predict_with_features = poisoned
    n = 5
    images = np.stack([np.full((64, 64), 7 if i == 2 else 40 * i + 10, np.uint8) for i in range(n)])
    batch = {"path": np.array([f"/a/{i}.jpeg" for i in range(n)], dtype=object),
             "size_bytes": np.full(n, 10), "mtime_ns": np.full(n, 1), "etag_or_sha256": np.full(n, "x", dtype=object),
             "status": np.array(["ok", "ok", "ok", "ok", "error"], dtype=object),
             "error": np.array([None] * 4 + ["broken"], dtype=object),
             "error_kind": np.array([None] * 4 + ["corrupt"], dtype=object), "image": images}
    rows = actor(batch).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "error"]
    assert [r["error_kind"] for r in rows] == [None, None, "model", None, "corrupt"]
    assert rows[2]["error"] == "model failed on this image (RuntimeError: engine error: bad input)"
    assert all(rows[i]["probability"] is not None for i in (0, 1, 3)) and rows[2]["probability"] is None

    actor.predictor.predict_with_features = None  # anything else failing: the batch's ok rows, not the run
    rows = actor(batch).to_pylist()
    assert [r["error_kind"] for r in rows] == ["model"] * 4 + ["corrupt"]
    assert rows[0]["error"].startswith("model failed on")


# ---------------------------------------------------------------- S3 in, S3 out, manifest


def test_s3_in_and_out_and_manifest(ray_local, bundle, s3_server, tmp_path) -> None:  # noqa: ANN001
    local = tmp_path / "in"
    (local / "2024" / "01").mkdir(parents=True)
    (local / "2024" / "01" / "a.jpeg").write_bytes(_jpeg(50))
    (local / "2024" / "b.png").write_bytes(_png(51))
    (local / "c.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    s3_server.make_bucket("scoring-in")
    s3_server.make_bucket("scoring-out")
    s3_server.upload_dir(local, "scoring-in", "archive")
    ep = ["--s3-endpoint", s3_server.endpoint]

    result = score("s3://scoring-in/archive", bundle, "s3://scoring-out/scores", *ep)
    assert result.run_dir.startswith("s3://scoring-out/scores/_pneumo/runs/") and result.table == "s3://scoring-out/scores"
    df = read_results(Location.resolve("s3://scoring-out/scores", s3_server.endpoint))
    assert dict(zip(df.path, df.status)) == {
        "s3://scoring-in/archive/2024/01/a.jpeg": "ok",
        "s3://scoring-in/archive/2024/b.png": "ok",
        "s3://scoring-in/archive/c.jpeg": "error",
    }
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="scoring-out")["Contents"]]
    assert "scores/_delta_log/00000000000000000000.json" in keys  # a Delta table on S3
    ok = df[df.status == "ok"]
    assert ok.etag.str.len().eq(32).all() and (df.inode == -1).all()  # the S3 fingerprint: size and ETag

    manifest = tmp_path / "list.txt"
    manifest.write_text("# nightly list\ns3://scoring-in/archive/2024/b.png\n\ns3://scoring-in/archive/gone.jpeg\n")
    listed = score(None, bundle, tmp_path / "out2", "--manifest", str(manifest), *ep)
    rows = read_results(str(tmp_path / "out2"))
    assert listed.n_scored == 2
    assert {p: _nn(k) for p, k in zip(rows.path, rows.error_kind)} == {
        "s3://scoring-in/archive/2024/b.png": None, "s3://scoring-in/archive/gone.jpeg": "missing"}
