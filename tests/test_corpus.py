"""The bad-input corpus (tests/corpus/make_corpus.py) through every path that reads images.

One table of kinds, four checks: decode gives the right `DecodeError` kind or an image; the one
read path (`pneumo.io.reading.read_image`) gives the same kind to scoring, training ingest and
evaluation; a real batch-scoring run gives exactly one row per listed entry; the real Serve
endpoint answers every corpus file with the right 4xx (never a 500). Plus the memory bound for
a PNG bomb (in a subprocess), compressed DICOM against pydicom's uncompressed references, EXIF
orientation, a file that changes between listing and reading, and a zero-byte S3 object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from corpus.make_corpus import (
    NON_UTF8_NAME,
    byte_kinds,
    exif_rotated_jpeg,
    make_corpus,
    pattern,
    rgba_bomb_png,
)
from helpers import REPO, TINY_SPEC_KW, score

from pneumo.data import listing as D
from pneumo.data.ingest import load_batch
from pneumo.io.preprocess import DecodeError, InputSpec, decode, load_image
from pneumo.io.reading import KINDS, read_image
from pneumo.io.storage import Location
from pneumo.score.runs import read_results
from pneumo.score.tasks import read_and_preprocess

SPEC = InputSpec(**TINY_SPEC_KW)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


_NAMES = list(byte_kinds())  # the kinds with bytes of their own (built once, cached)


def test_corpus_has_at_least_30_kinds(corpus) -> None:  # noqa: ANN001
    _, cases = corpus
    assert len(cases) >= 30
    assert {c.row for c in cases.values()} - {None, "ok"} == set(KINDS)  # every error kind occurs


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("name", _NAMES)
def test_decode_gives_an_image_or_a_decode_error_of_the_expected_kind(corpus, name: str) -> None:  # noqa: ANN001
    root, cases = corpus
    case = cases[name]
    blob = (root / case.rel).read_bytes()
    try:
        out = load_image(blob, case.rel, SPEC)
        got = "ok"
    except DecodeError as exc:  # anything else fails the test: only DecodeError may escape
        got = exc.kind
        assert exc.reason and exc.kind in KINDS
    assert got == case.decode
    if got == "ok":
        assert out.shape == (SPEC.size, SPEC.size) and out.dtype == np.uint8


def test_exif_orientation_is_applied_in_jpeg_decode_with_draft() -> None:
    for draft in (None, 32):
        img = decode(exif_rotated_jpeg(), "r.jpeg", draft_size=draft)
        w, h = img.size  # stored 120x80 sideways, Orientation 6: upright is portrait
        assert (w, h) == ((80, 120) if draft is None else (40, 60))  # draft still halves it
        if draft is None:  # upright = the stored pattern turned 90 degrees clockwise
            upright = np.rot90(pattern(), k=-1).astype(np.int16)
            assert np.abs(np.asarray(img, dtype=np.int16) - upright).mean() < 3


def test_multiframe_rgb_dicom_gives_its_first_frame() -> None:
    from corpus.make_corpus import dicom

    frames = np.zeros((3, 40, 50, 3), np.uint8)
    frames[0, :, :25] = 200  # left half bright in frame 0 only
    frames[1:, :, 25:] = 255
    px = np.asarray(decode(dicom(frames, frames=3, photometric="RGB"), "m.dcm"))
    assert px.shape == (40, 50) and px[:, :25].min() == 255 and px[:, 25:].max() == 0


def test_dicom_frame_budget_counts_frames_and_samples() -> None:
    from corpus.make_corpus import dicom

    blob = dicom(np.zeros((4, 20, 20, 3), np.uint8), frames=4, photometric="RGB")  # 4 x 20 x 20 x 3 = 4800
    assert decode(blob, "f.dcm", max_pixels=4800).size == (20, 20)
    with pytest.raises(DecodeError) as info:
        decode(blob, "f.dcm", max_pixels=4799)
    assert info.value.kind == "too_large" and "4 frame(s)" in info.value.reason


@pytest.mark.parametrize("reference,compressed", [
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),  # JPEG-LS lossless
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),  # JPEG 2000 lossless
    ("MR_small.dcm", "MR_small_RLE.dcm"),  # RLE lossless
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG Lossless, process 14 SV1
])
def test_compressed_dicom_decodes_like_its_uncompressed_reference(reference: str, compressed: str) -> None:
    from pydicom.data import get_testdata_file

    ref, comp = (get_testdata_file(n, download=False) for n in (reference, compressed))
    assert ref and comp, "these ship with pydicom"
    a = np.asarray(decode(Path(ref).read_bytes(), reference), dtype=np.int16)
    b = np.asarray(decode(Path(comp).read_bytes(), compressed), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_htj2k_transfer_syntax_decodes() -> None:
    from corpus.make_corpus import dicom
    from pydicom.uid import HTJ2KLossless

    ramp = (np.arange(64 * 48).reshape(64, 48) % 4096).astype(np.uint16)
    plain = np.asarray(decode(dicom(ramp, bits=16), "p.dcm"))
    ht = np.asarray(decode(dicom(ramp, bits=16, syntax=HTJ2KLossless), "h.dcm"))
    assert np.array_equal(plain, ht)


PEAK_SCRIPT = """
import sys
from pneumo.io.preprocess import InputSpec, load_image

def kib(field):  # VmHWM: this process's peak RSS (ru_maxrss would count the forking parent's)
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(field)).split()[1])

spec = InputSpec(size=224, channels=1, mean=(0.0,), std=(1.0,))
load_image(open(sys.argv[1], "rb").read(), "warm.png", spec)  # imports and allocator warm-up
data = open(sys.argv[2], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS
before = kib("VmRSS:")
load_image(data, "bomb.png", spec)
print((kib("VmHWM:") - before) // 1024)
"""


def test_rgba_png_bomb_peak_memory_is_bounded(tmp_path) -> None:  # noqa: ANN001
    """A 70 KB 4000x4000 RGBA PNG: 64 MB decoded; the gray conversion adds two 16 MB planes,
    not full-size RGBA copies: ~106 MiB (it cost ~305 MiB before)."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(rgba_bomb_png(4000))
    assert bomb.stat().st_size < 100_000
    small = tmp_path / "small.png"
    small.write_bytes(rgba_bomb_png(64))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(small), str(bomb)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=120, check=True)
    grew_mib = int(out.stdout.strip())
    assert grew_mib < 125, f"peak RSS grew {grew_mib} MiB decoding a 4000x4000 RGBA PNG"


# ---------------------------------------------------------------- listing and the one read path


def test_listing_has_every_entry_and_survives_non_utf8_names(corpus) -> None:  # noqa: ANN001
    root, cases = corpus
    records = D.list_images(str(root))
    got = sorted(os.path.relpath(r.path, root) for r in records)
    assert got == sorted(c.rel for c in cases.values() if c.row is not None)
    escaped = [r.path for r in records if "\\x" in r.path]
    assert escaped == [str(root / NON_UTF8_NAME.decode("utf-8", "backslashreplace"))]
    assert escaped[0].encode("utf-8")  # fits a UTF-8 (Arrow/Parquet) column
    res = read_image(escaped[0], SPEC)
    assert res.ok and res.image.shape == (64, 64)  # and reads back from its escaped form


def test_scoring_ingest_and_evaluation_share_one_error_vocabulary(corpus) -> None:  # noqa: ANN001
    root, cases = corpus
    records = D.list_images(str(root))
    by_rel = {os.path.relpath(r.path, root): r for r in records}
    paths = np.asarray([r.path for r in records], dtype=object)
    scored = read_and_preprocess({"path": paths, "size_bytes": np.asarray([r.size for r in records]),
                                  "mtime_ns": np.asarray([r.mtime_ns for r in records])}, SPEC, Location.of(root))
    ingested = load_batch({"path": paths, "label": np.zeros(len(paths), np.int64)}, SPEC.to_dict(), Location.of(root))
    for i, rec in enumerate(records):  # evaluation reads with scoring's read_and_preprocess
        kinds = {
            "scoring": scored["error_kind"][i] or "ok",
            "ingest": ingested["error_kind"][i] or "ok",
            "read_image": (read_image(rec.path, SPEC).error or type("o", (), {"kind": "ok"})).kind,
        }
        rel = os.path.relpath(rec.path, root)
        expected = next(c.row for c in cases.values() if c.rel == rel)
        assert set(kinds.values()) == {expected}, f"{rel}: {kinds}"
    assert set(by_rel) and all(k in KINDS for k in scored["error_kind"] if k)


def test_file_changed_or_deleted_between_listing_and_reading(tmp_path) -> None:  # noqa: ANN001
    from corpus.make_corpus import _encode
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_encode(Image.new("L", (30, 20), 10), "PNG"))
    b.write_bytes(a.read_bytes())
    records = D.list_images(str(tmp_path))
    new = _encode(Image.new("L", (50, 40), 200), "PNG")
    a.write_bytes(new)  # rewritten after listing
    b.unlink()  # deleted after listing
    out = read_and_preprocess({"path": np.asarray([r.path for r in records], dtype=object),
                               "size_bytes": np.asarray([r.size for r in records]),
                               "mtime_ns": np.asarray([r.mtime_ns for r in records])}, SPEC, Location.of(tmp_path))
    import hashlib

    assert list(out["status"]) == ["ok", "error"] and out["error_kind"][1] == "missing"
    assert out["etag_or_sha256"][0] == hashlib.sha256(new).hexdigest()  # the bytes that were scored
    assert out["size_bytes"][0] == records[0].size  # the listed size: the next --incremental rescans it


def test_zero_byte_s3_object_is_an_empty_row(s3_server) -> None:  # noqa: ANN001
    s3_server.make_bucket("corpus-empty")
    s3_server.client().put_object(Bucket="corpus-empty", Key="x/empty.png", Body=b"")
    store = Location.resolve("s3://corpus-empty/x", s3_server.endpoint)
    records = D.list_images(store)
    assert [(r.path, r.size) for r in records] == [("s3://corpus-empty/x/empty.png", 0)]
    res = read_image(store.at(records[0].path), SPEC)
    assert res.error.kind == "empty" and res.sha256 is not None
    gone = read_image(store.join("gone.png"), SPEC)
    assert gone.error.kind == "missing"


# ---------------------------------------------------------------- batch scoring: one row per entry


def test_scoring_run_gives_exactly_one_row_per_entry(ray_local, threshold_bundle, corpus, tmp_path) -> None:  # noqa: ANN001
    root, cases = corpus
    result = score(root, threshold_bundle, tmp_path / "out")
    df = read_results(str(tmp_path / "out"))
    listed = {c.rel: c.row for c in cases.values() if c.row is not None}
    got = {os.path.relpath(p, root): (k if isinstance(k, str) else "ok") for p, k in zip(df.path, df.error_kind)}
    assert len(df) == len(listed) == result.n_listed
    assert got == listed
    errors = df[df.status == "error"]
    assert errors.error.str.len().gt(0).all() and errors.probability.isna().all()
    assert not errors.error.str.contains(str(root), regex=False).any()  # messages carry no paths
    print(json.dumps(result.errors))


# ---------------------------------------------------------------- serving: a 4xx, never a 500

def test_serving_answers_every_corpus_file_without_a_500(served, corpus) -> None:  # noqa: ANN001
    root, cases = corpus
    got, want = {}, {}
    with httpx.Client(base_url=served.url, timeout=120) as c:
        for name in _NAMES:
            case = cases[name]
            if case.http is None:
                continue
            r = c.post("/v1/predict", content=(root / case.rel).read_bytes(),
                       headers={"content-type": "application/octet-stream"})
            got[name], want[name] = r.status_code, case.http
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["status"] == r.status_code and err["message"] and err["kind"] in KINDS, r.text
    assert got == want
