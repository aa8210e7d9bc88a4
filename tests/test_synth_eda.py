"""`pneumo synth` (deterministic, realistic layout and names, a visible signal) and `pneumo eda`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo.cli import main as cli_main
from pneumo.data import datasets as data
from pneumo.data import eda
from pneumo.data.synth import synthesize
from pneumo.io.preprocess import InputSpec, load_image

PNEUMO = str(Path(sys.executable).parent / "pneumo")
NORMAL_NAME = re.compile(r"^(NORMAL2-)?IM-\d{4}-\d{4}\.jpeg$")
PNEUMONIA_NAME = re.compile(r"^person\d+_(bacteria|virus)_\d+\.jpeg$")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- synth


def test_synth_is_deterministic(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", 12, seed=3, size_range=(64, 96))
    synthesize(tmp_path / "b", 12, seed=3, size_range=(64, 96), workers=1)
    synthesize(tmp_path / "c", 12, seed=4, size_range=(64, 96))
    assert len(a) == 12
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert ta == tb  # same seed: same names, same bytes (threads do not matter)
    assert ta != tc


def test_synth_layout_names_and_sizes(synth_data: Path) -> None:
    files = sorted(synth_data.rglob("*"))
    images = [p for p in files if p.is_file()]
    assert len(images) == 120
    assert {p.parent.relative_to(synth_data).as_posix() for p in images} == {"train/NORMAL", "train/PNEUMONIA"}
    by_class = Counter(p.parent.name for p in images)
    assert by_class == {"NORMAL": 48, "PNEUMONIA": 72}  # pneumonia_frac=0.6
    for p in images:
        pattern = NORMAL_NAME if p.parent.name == "NORMAL" else PNEUMONIA_NAME
        assert pattern.match(p.name), p.name
    names = [p.name for p in images]
    assert any(n.startswith("IM-") for n in names) and any(n.startswith("NORMAL2-IM-") for n in names)
    assert any("_bacteria_" in n for n in names) and any("_virus_" in n for n in names)
    for p in images[::10]:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.mode == "L"
            assert all(256 <= s <= 384 for s in img.size), img.size


def test_synth_patients_have_several_images_and_one_cause(synth_data: Path) -> None:
    records = data.discover(str(synth_data), "three_class")
    per_patient = Counter(r.patient_id for r in records)
    assert max(per_patient.values()) >= 2
    assert sum(1 for c in per_patient.values() if c >= 2) >= 10
    causes: dict[str, set[str]] = {}
    for r in records:
        causes.setdefault(r.patient_id, set()).add(r.label)
    assert all(len(c) == 1 for c in causes.values())


def test_synth_splits_are_by_patient(tmp_path: Path) -> None:
    synthesize(tmp_path, 60, seed=1, size_range=(48, 64), splits=("train", "val", "test"))
    records = data.discover(str(tmp_path))
    splits_of: dict[str, set[str]] = {}
    for r in records:
        splits_of.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    counts = data.class_counts(records)
    assert set(counts) == {"train", "val", "test"}
    assert all(set(c) == {"NORMAL", "PNEUMONIA"} for c in counts.values())


def test_synth_signal_survives_downscaling(synth_data: Path) -> None:
    """At 32 px the lung fields are brighter with pneumonia; bacterial opacities are one-sided."""
    records = data.discover(str(synth_data), "three_class")
    spec = InputSpec(size=32, channels=1, mean=(0.0,), std=(1.0,))
    x = np.stack([load_image(Path(r.path).read_bytes(), r.path, spec) for r in records]).astype(float)
    labels = np.array([r.label for r in records])
    left, right = x[:, 10:24, 5:14].mean((1, 2)), x[:, 10:24, 18:27].mean((1, 2))
    lungs, asymmetry = left + right, np.abs(left - right)
    sick, normal = lungs[labels != "NORMAL"], lungs[labels == "NORMAL"]
    auc = (sick[:, None] > normal[None, :]).mean()
    assert auc > 0.85, auc
    assert asymmetry[labels == "BACTERIA"].mean() > 2 * asymmetry[labels == "VIRUS"].mean()


def test_synth_cli(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "s"
    rc = cli_main(["synth", str(out), "--n", "8", "--seed", "2", "--min-size", "40", "--max-size", "50"])
    assert rc == 0
    assert "wrote 8 images" in capsys.readouterr().out
    assert len(data.list_images(str(out))) == 8
    with pytest.raises(SystemExit):
        cli_main(["synth", str(out), "--n", "8", "--splits", "train,holdout"])
    assert "holdout" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"size_range": (100, 50)}, {"splits": ("train", "dev")},
                                    {"pneumonia_frac": 1.5}])
def test_synth_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"n": 4, **kwargs}
    with pytest.raises(ValueError):
        synthesize(tmp_path, **args)


# ---------------------------------------------------------------- eda


def test_eda_cli_prints_counts_and_writes_files(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "eda"
    proc = subprocess.run([PNEUMO, "eda", str(synth_data), "--out", str(out), "--image-size", "96"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert re.search(r"train\s+48\s+72\s+120", text), text
    assert "modes      L 120" in text and "formats    JPEG 120" in text
    assert "duplicates 0 groups" in text
    report = json.loads((out / "eda.json").read_text())
    assert report["counts"] == {"train": {"NORMAL": 48, "PNEUMONIA": 72}}
    assert report["totals"] == {"NORMAL": 48, "PNEUMONIA": 72}
    assert 256 <= report["width"]["min"] <= report["width"]["mean"] <= report["width"]["max"] <= 384
    assert report["patients"]["train"] == len({r.patient_id for r in data.discover(str(synth_data))})
    for name in ("sample_grid.png", "class_balance.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 300


def test_eda_three_class(synth_data: Path) -> None:
    report = eda.describe(str(synth_data), "three_class")
    assert report["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]
    totals = report["totals"]
    assert totals["NORMAL"] == 48 and totals["BACTERIA"] + totals["VIRUS"] == 72
    assert totals["BACTERIA"] > 0 and totals["VIRUS"] > 0


@pytest.fixture
def messy_copy(synth_data: Path, tmp_path: Path) -> Path:
    """The synthetic set plus a duplicate (under another patient), a corrupt JPEG, an RGB PNG and a DICOM."""
    from helpers import dicom_bytes

    root = tmp_path / "messy"
    shutil.copytree(synth_data, root)
    normal = sorted((root / "train" / "NORMAL").iterdir())
    shutil.copyfile(normal[0], root / "train" / "NORMAL" / "IM-9999-0001.jpeg")
    (root / "train" / "PNEUMONIA" / "person9999_virus_9999.jpeg").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    Image.new("RGB", (500, 300), (90, 90, 90)).save(root / "train" / "NORMAL" / "IM-9998-0001.png")
    pixels = np.tile(np.arange(600, dtype=np.uint16), (700, 1))
    (root / "train" / "PNEUMONIA" / "person9998_bacteria_9998.dcm").write_bytes(dicom_bytes(pixels, "MONOCHROME1"))
    return root


def test_eda_names_files_by_hash_unless_opted_in(messy_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File names carry patient ids: eda.json and the printed report hold salted hashes by default."""
    from pneumo.privacy import LOG_PATHS_ENV, redact

    monkeypatch.delenv(LOG_PATHS_ENV, raising=False)
    report = eda.describe(str(messy_copy))
    text = json.dumps(report) + eda.format_report(report)
    for patient in ("person9999", "IM-9999"):
        assert patient not in text
    bad = str(messy_copy / "train" / "PNEUMONIA" / "person9999_virus_9999.jpeg")
    assert report["unreadable"][0]["path"] == redact(bad) and redact(bad) in text
    assert all(p.startswith("file#") for g in report["duplicates"] for p in g["paths"])


def test_eda_reports_duplicates_and_unreadable_files(messy_copy: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMO_LOG_PATHS", "1")  # the operator opted in to file names
    out = tmp_path / "eda"
    assert cli_main(["eda", str(messy_copy), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    first = sorted((messy_copy / "train" / "NORMAL").iterdir())[0].name
    assert "duplicates 1 groups of identical files (1 extra copies)" in text
    assert f"{first} = IM-9999-0001.jpeg  [cross_patient]" in text
    assert "unreadable 1" in text and "person9999_virus_9999.jpeg" in text
    report = json.loads((out / "eda.json").read_text())
    (group,) = report["duplicates"]
    assert [Path(p).name for p in group["paths"]] == [first, "IM-9999-0001.jpeg"]
    assert group["cross_patient"] and not group["cross_split"]
    assert report["counts"]["train"] == {"NORMAL": 50, "PNEUMONIA": 74}
    assert report["formats"] == {"JPEG": 121, "PNG": 1, "DICOM": 1}
    assert report["modes"] == {"L": 121, "RGB": 1, "MONOCHROME1 12-bit": 1}
    assert report["width"]["min"] == 256 and report["width"]["max"] == 600  # the DICOM is 600 wide
    assert report["height"]["max"] == 700
    assert (out / "sample_grid.png").exists()  # the corrupt file is skipped, not fatal


def test_eda_without_labelled_images_is_a_clear_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpeg").write_bytes(b"x")
    assert cli_main(["eda", str(tmp_path / "flat"), "--out", str(tmp_path / "o")]) == 2
    assert "no labelled images" in capsys.readouterr().err


def test_eda_sample_picks_are_spread_and_deterministic(synth_data: Path) -> None:
    records = data.discover(str(synth_data))
    picks = eda.pick_samples(records, 4)
    assert set(picks) == {"NORMAL", "PNEUMONIA"}
    assert [r.path for r in picks["NORMAL"][:4]] == [r.path for r in eda.pick_samples(records[::-1], 4)["NORMAL"][:4]]
    assert len({r.patient_id for r in picks["PNEUMONIA"][:4]}) >= 3


@pytest.mark.shared_data
def test_eda_on_the_real_train_split(shared_data: Path, tmp_path: Path) -> None:
    location = shared_data / "chest_xray_224"
    if not location.is_dir():
        pytest.skip(f"{location} not found")
    out = tmp_path / "eda"
    proc = subprocess.run([PNEUMO, "eda", str(location), "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PNEUMO_LOG_PATHS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"train\s+1,341\s+3,875\s+5,216", proc.stdout), proc.stdout
    report = json.loads((out / "eda.json").read_text())
    assert report["totals"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert report["width"] == {"min": 224, "mean": 224.0, "max": 224}
    dup_names = {Path(p).name for g in report["duplicates"] for p in g["paths"]}
    assert {"person1430_bacteria_3695.jpeg", "person1430_bacteria_3696.jpeg"} <= dup_names


@pytest.mark.parametrize("log_paths, flag, listed", [
    (False, [], False), (True, [], True), (False, ["--show-paths"], True), (True, ["--show-paths"], True)])
def test_eda_lists_duplicate_groups_files_for_the_operator(messy_copy: Path, tmp_path: Path, capsys,  # noqa: ANN001
                                                           monkeypatch: pytest.MonkeyPatch, log_paths: bool,
                                                           flag: list[str], listed: bool) -> None:
    """PNEUMO_LOG_PATHS=1 or --show-paths list every duplicate group's files by full path on the
    console; eda.json keeps salted hashes unless PNEUMO_LOG_PATHS=1."""
    if log_paths:
        monkeypatch.setenv("PNEUMO_LOG_PATHS", "1")
    else:
        monkeypatch.delenv("PNEUMO_LOG_PATHS", raising=False)
    out = tmp_path / "eda"
    assert cli_main(["eda", str(messy_copy), "--out", str(out), "--samples", "1", *flag]) == 0
    text = capsys.readouterr().out
    copy = str(messy_copy / "train" / "NORMAL" / "IM-9999-0001.jpeg")
    first = str(sorted((messy_copy / "train" / "NORMAL").iterdir())[0])
    assert ("duplicate group 1 (sha256 " in text and f"  {first}\n" in text and f"  {copy}" in text) == listed
    saved = (out / "eda.json").read_text()
    assert ("IM-9999" in saved) == log_paths and "duplicate_files" not in saved
