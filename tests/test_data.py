"""Data locations: listing, labels, patient ids and the patient-grouped split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pneumo.data import datasets as data
from pneumo.data import listing
from pneumo.data.listing import DataError, ImageRecord
from pneumo.data.synth import synthesize
from pneumo.io.storage import Location, StorageError, is_s3


@pytest.mark.parametrize(
    "path, expected",
    [
        ("person1430_bacteria_3695.jpeg", "person1430"),
        ("person1_virus_6.jpeg", "person1"),
        ("/data/train/PNEUMONIA/person78_bacteria_382.jpeg", "person78"),
        ("s3://xrays/train/PNEUMONIA/person12_virus_2.jpeg", "person12"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("/d/train/NORMAL/IM-0001-0002.jpeg", "IM-0001"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "NORMAL2-IM-0587"),
        ("scan_42.png", "scan_42"),  # no patient part: the stem
        ("archive/2024/x.dcm", "x"),
    ],
)
def test_patient_id(path: str, expected: str) -> None:
    assert data.patient_id(path) == expected


@pytest.mark.parametrize(
    "folder, name, label_set, expected",
    [
        ("NORMAL", "IM-0001-0001.jpeg", "binary", "NORMAL"),
        ("PNEUMONIA", "person1_bacteria_1.jpeg", "binary", "PNEUMONIA"),
        ("pneumonia", "person1_virus_1.jpeg", "binary", "PNEUMONIA"),
        ("NORMAL", "IM-0001-0001.jpeg", "three_class", "NORMAL"),
        ("PNEUMONIA", "person1_bacteria_1.jpeg", "three_class", "BACTERIA"),
        ("PNEUMONIA", "person1_virus_2.jpeg", "three_class", "VIRUS"),
        ("PNEUMONIA", "PERSON3_VIRUS_9.JPEG", "three_class", "VIRUS"),
        ("BACTERIA", "scan.png", "three_class", "BACTERIA"),
        ("VIRUS", "scan.png", "three_class", "VIRUS"),
    ],
)
def test_label_for(folder: str, name: str, label_set: str, expected: str) -> None:
    assert data.label_for(folder, name, label_set) == expected


@pytest.mark.parametrize(
    "folder, name, label_set, message",
    [
        ("COVID", "x.jpeg", "binary", "NORMAL, PNEUMONIA"),
        ("PNEUMONIA", "scan.jpeg", "three_class", "bacteria from virus"),
        ("NORMAL", "x.jpeg", "five_class", "valid: binary, three_class"),
    ],
)
def test_label_for_errors(folder: str, name: str, label_set: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        data.label_for(folder, name, label_set)


# ---------------------------------------------------------------- patient split


def fake_records(n_patients: int = 400, seed: int = 0) -> list[ImageRecord]:
    """Records of `n_patients` patients with 1-4 images each, ~30% NORMAL."""
    import random

    rnd = random.Random(seed)
    out = []
    image_no = 0
    for p in range(n_patients):
        normal = rnd.random() < 0.3
        for k in range(rnd.randint(1, 4)):
            image_no += 1
            name = f"IM-{p:04d}-{k + 1:04d}.jpeg" if normal else f"person{p}_bacteria_{image_no}.jpeg"
            label = "NORMAL" if normal else "PNEUMONIA"
            path = f"/d/train/{label}/{name}"
            out.append(ImageRecord(path, split="train", label=label, patient_id=data.patient_id(path)))
    return out


def _patients_by_split(records: list[ImageRecord]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(r.split, set()).add(r.patient_id)
    return out


def test_split_by_patient_has_no_leakage() -> None:
    split = data.split_by_patient(fake_records(), val_frac=0.15, test_frac=0.15, seed=1)
    by_split = _patients_by_split(split)
    assert set(by_split) == {"train", "val", "test"}
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    # every image of a patient is in that patient's split
    owner = {pid: s for s, pids in by_split.items() for pid in pids}
    assert all(r.split == owner[r.patient_id] for r in split)


def test_split_by_patient_is_deterministic_and_seeded() -> None:
    records = fake_records()
    a = data.split_by_patient(records, 0.1, 0.1, seed=0)
    b = data.split_by_patient(list(reversed(records)), 0.1, 0.1, seed=0)
    assert sorted((r.path, r.split) for r in a) == sorted((r.path, r.split) for r in b)
    c = data.split_by_patient(records, 0.1, 0.1, seed=1)
    assert [r.split for r in a] != [r.split for r in c]


@pytest.mark.parametrize("val_frac, test_frac", [(0.1, 0.1), (0.2, 0.1), (0.0, 0.25)])
def test_split_by_patient_matches_fractions_per_class(val_frac: float, test_frac: float) -> None:
    records = fake_records()
    split = data.split_by_patient(records, val_frac, test_frac, seed=0)
    for label in ("NORMAL", "PNEUMONIA"):
        pats = _patients_by_split([r for r in split if r.label == label])
        total = sum(len(p) for p in pats.values())
        assert abs(len(pats.get("val", ())) - val_frac * total) <= 1
        assert abs(len(pats.get("test", ())) - test_frac * total) <= 1
    assert len(split) == len(records)


@pytest.mark.parametrize("val_frac, test_frac", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_split_by_patient_rejects_bad_fractions(val_frac: float, test_frac: float) -> None:
    with pytest.raises(DataError, match="sum < 1"):
        data.split_by_patient(fake_records(10), val_frac, test_frac)


# ---------------------------------------------------------------- labelled layouts


def test_labelled_splits_carves_val_and_test_by_patient(synth_data: Path) -> None:
    found = data.discover(str(synth_data))
    assert {r.split for r in found} == {"train"}
    records = data.labelled_splits(str(synth_data), val_frac=0.2, test_frac=0.2, seed=0)
    assert sorted(r.path for r in records) == sorted(r.path for r in found)
    by_split = _patients_by_split(records)
    assert set(by_split) == {"train", "val", "test"}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not by_split["val"] & by_split["test"]
    counts = Counter(r.split for r in records)
    assert counts["val"] > 5 and counts["test"] > 5 and counts["train"] > counts["val"] + counts["test"]
    assert records == data.labelled_splits(str(synth_data), val_frac=0.2, test_frac=0.2, seed=0)


@pytest.fixture(scope="module")
def three_split_data(tmp_path_factory) -> Path:  # noqa: ANN001
    root = tmp_path_factory.mktemp("three_split")
    synthesize(root, 40, seed=5, size_range=(48, 64), splits=("train", "val", "test"))
    return root


def test_labelled_splits_keeps_existing_splits(three_split_data: Path) -> None:
    records = data.labelled_splits(str(three_split_data))
    assert records == sorted(data.discover(str(three_split_data)), key=lambda r: r.path)
    for r in records:  # the split is the folder it lives in
        assert f"/{r.split}/{r.label}/" in r.path


def test_labelled_splits_carves_only_what_is_missing(three_split_data: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "no_val"
    shutil.copytree(three_split_data / "train", root / "train")
    shutil.copytree(three_split_data / "test", root / "test")
    records = data.labelled_splits(str(root), val_frac=0.25, test_frac=0.25)
    test_on_disk = {str(p) for p in (root / "test").rglob("*.jpeg")}
    assert {r.path for r in records if r.split == "test"} == test_on_disk  # kept, not re-carved
    val = [r for r in records if r.split == "val"]
    assert val and all("/train/" in r.path for r in val)  # carved out of train


def test_discover_three_class_and_ignores_files_outside_the_layout(synth_data: Path) -> None:
    records = data.discover(str(synth_data), "three_class")
    assert {r.label for r in records} == {"NORMAL", "BACTERIA", "VIRUS"}
    for r in records:
        if r.label != "NORMAL":
            assert r.label.lower() in Path(r.path).name


def test_discover_errors(tmp_path: Path) -> None:
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.jpeg").write_bytes(b"x")
    with pytest.raises(DataError, match="no labelled images"):
        data.discover(str(tmp_path))
    (tmp_path / "train" / "COVID").mkdir(parents=True)
    (tmp_path / "train" / "COVID" / "b.jpeg").write_bytes(b"x")
    with pytest.raises(DataError, match="COVID"):
        data.discover(str(tmp_path))
    with pytest.raises(DataError, match="valid: binary, three_class"):
        data.discover(str(tmp_path), "four_class")


# ---------------------------------------------------------------- listing


def test_list_images_nesting_and_extension_filter(tmp_path: Path) -> None:
    files = {
        "a.jpeg": b"1", "b/c.JPG": b"22", "b/d/e.png": b"333", "b/d/f/g.dcm": b"4444", "h.dicom": b"5",
        "notes.txt": b"x", "b/i.gif": b"x", "b/.hidden.jpeg": b"x", "j.jpeg.bak": b"x",
    }
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    records = listing.list_images(str(tmp_path), extensions=listing.IMAGE_EXTENSIONS)
    rels = [Path(r.path).relative_to(tmp_path).as_posix() for r in records]
    assert rels == ["a.jpeg", "b/c.JPG", "b/d/e.png", "b/d/f/g.dcm", "h.dicom"]
    assert [r.size for r in records] == [1, 2, 3, 4, 1]
    assert all(Path(r.path).is_absolute() and r.mtime_ns > 0 for r in records)
    every = [Path(r.path).relative_to(tmp_path).as_posix() for r in listing.list_images(str(tmp_path))]
    assert every == ["a.jpeg", "b/c.JPG", "b/d/e.png", "b/d/f/g.dcm", "b/i.gif", "h.dicom", "j.jpeg.bak",
                     "notes.txt"]  # the default archive listing: every entry but hidden ones
    only_png = listing.list_images(str(tmp_path), extensions=(".png",))
    assert [Path(r.path).name for r in only_png] == ["e.png"]
    assert [Path(r.path).name for r in listing.list_images(str(tmp_path / "b" / "d" / "e.png"))] == ["e.png"]
    with pytest.raises(DataError, match="no such folder"):
        listing.list_images(str(tmp_path / "missing"))


def test_location_join_and_is_s3() -> None:
    assert Location.resolve("s3://b/p/").join("train", "/NORMAL/").uri == "s3://b/p/train/NORMAL"
    assert Location.resolve("/x/y").join("z").uri == "/x/y/z"
    assert is_s3("s3://b") and not is_s3("/s3://b")
    with pytest.raises(StorageError, match="s3://bucket/prefix"):
        Location.resolve("s3:///key")
    here = Location.resolve("s3://b/p", "http://127.0.0.1:9")
    assert here.at("s3://b/q/x.png") == Location("s3://b/q/x.png", "http://127.0.0.1:9")  # same store
    assert here.path == "b/p" and here.name == "p" and here.parent.uri == "s3://b"


def test_fingerprint_tracks_content_of_the_listing() -> None:
    from dataclasses import replace

    records = fake_records(20)
    fp = data.fingerprint(records)
    assert fp == data.fingerprint(list(reversed(records)))  # order does not matter
    i = next(k for k, r in enumerate(records) if r.label == "PNEUMONIA")
    relabelled = records[:i] + [replace(records[i], label="NORMAL")] + records[i + 1:]
    assert data.fingerprint(relabelled) != fp
    assert data.fingerprint(records[1:]) != fp


_TIED_SPLIT = """
from pneumo.data import datasets as data
from pneumo.data.listing import ImageRecord
recs = []
for p in range(300):  # a third of the patients: one bacteria and one virus image (a tie, as in the real data)
    causes = [("bacteria", "virus"), ("bacteria",), ("virus",)][p % 3]
    for k, cause in enumerate(causes):
        path = f"/d/train/PNEUMONIA/person{p}_{cause}_{2 * p + k}.jpeg"
        recs.append(ImageRecord(path, split="train", label=cause.upper(), patient_id=f"person{p}"))
recs += [ImageRecord(f"/d/train/NORMAL/IM-{p:04d}-0001.jpeg", split="train", label="NORMAL",
                     patient_id=f"IM-{p:04d}") for p in range(100)]
print(data.fingerprint(data.split_by_patient(recs, 0.2, 0.2, seed=0)))
"""


def test_split_by_patient_is_the_same_in_every_process() -> None:
    """Ties between a patient's labels must not be broken by set order (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    prints = set()
    for hash_seed in ("1", "2"):  # these two order {"BACTERIA", "VIRUS"} differently
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _TIED_SPLIT], env=env, capture_output=True, text=True, check=True)
        prints.add(out.stdout.strip())
    assert len(prints) == 1, prints


# ---------------------------------------------------------------- a sample (`pneumo train --limit N`)


@pytest.mark.parametrize("n", [40, 150, 400])
@pytest.mark.parametrize("seed", [0, 3])
def test_limit_sample_is_about_n_whole_patients_class_ratio_kept(n: int, seed: int) -> None:
    records = fake_records(400)  # ~1000 images, 1-4 per patient
    sample = data.limit_sample(records, n, seed=seed)
    assert abs(len(sample) - n) <= max(6, 0.08 * n), len(sample)  # whole patients: a few images either way
    chosen = {r.patient_id for r in sample}
    assert sorted(r.path for r in sample) == sorted(r.path for r in records if r.patient_id in chosen)
    share = Counter(r.label for r in records)["NORMAL"] / len(records)
    assert abs(Counter(r.label for r in sample)["NORMAL"] / len(sample) - share) < 0.05
    assert sample == data.limit_sample(list(records), n, seed=seed)  # seeded: the same sample again


def test_limit_sample_keeps_everything_at_or_above_the_size_and_at_zero() -> None:
    records = fake_records(50)
    for n in (0, len(records), len(records) + 5):
        assert data.limit_sample(records, n) == records


def test_labelled_splits_limit_samples_before_the_split(tmp_path: Path) -> None:
    synthesize(tmp_path, 80, seed=0, size_range=(32, 40))
    full = data.labelled_splits(str(tmp_path), val_frac=0.2, test_frac=0.2)
    limited = data.labelled_splits(str(tmp_path), val_frac=0.2, test_frac=0.2, limit=40)
    assert abs(len(limited) - 40) <= 6 < len(full) - 40
    assert {r.split for r in limited} == {"train", "val", "test"}
    assert {r.path for r in limited} <= {r.path for r in full}
