"""pneumo.data, `Location` and `pneumo eda` against a real S3 server (SeaweedFS `weed mini`, see conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumo.cli import main as cli_main
from pneumo.data import datasets as data
from pneumo.data.listing import DataError, ImageRecord, list_images
from pneumo.io.storage import Location
from pneumo.labels import LABEL_SETS

BUCKET = "xrays"
PREFIX = "chest/v1"


@pytest.fixture(scope="module")
def s3_dataset(s3_server, synth_data) -> str:  # noqa: ANN001
    """The session's synthetic data set uploaded to s3://xrays/chest/v1/."""
    s3_server.make_bucket(BUCKET)
    n = s3_server.upload_dir(synth_data, BUCKET, PREFIX)
    assert n == len(list_images(str(synth_data)))
    return f"s3://{BUCKET}/{PREFIX}"


def _rel(records: list[ImageRecord], root: str) -> list[tuple[str, int, str | None, str | None, str | None]]:
    root = root.rstrip("/") + "/"
    return [(r.path[len(root):], r.size, r.split, r.label, r.patient_id) for r in records]


def test_list_images_matches_local(s3_dataset, s3_server, synth_data) -> None:  # noqa: ANN001
    remote = list_images(Location.resolve(s3_dataset, s3_server.endpoint))
    local = list_images(str(synth_data))
    assert len(remote) == len(local) > 0
    assert all(r.path.startswith(s3_dataset + "/") for r in remote)
    assert _rel(remote, s3_dataset) == _rel(local, str(synth_data))


@pytest.mark.parametrize("label_set", ["binary", "three_class"])
def test_labelled_splits_match_local(s3_dataset, s3_server, synth_data, label_set) -> None:  # noqa: ANN001
    remote = data.labelled_splits(Location.resolve(s3_dataset, s3_server.endpoint), label_set)
    local = data.labelled_splits(str(synth_data), label_set)
    assert _rel(remote, s3_dataset) == _rel(local, str(synth_data))
    assert {r.split for r in remote} == {"train", "val", "test"}
    assert {r.label for r in remote} == set(LABEL_SETS[label_set])


def test_read_and_write_bytes(s3_dataset, s3_server, synth_data) -> None:  # noqa: ANN001
    store = Location.resolve(s3_dataset, s3_server.endpoint)
    rec = list_images(store)[0]
    local_path = Path(synth_data) / rec.path[len(s3_dataset) + 1:]
    assert store.at(rec.path).read_bytes() == local_path.read_bytes()

    target = Location.resolve(f"s3://{BUCKET}", s3_server.endpoint).join("scratch", "note.txt")
    target.write_bytes(b"hello")
    assert target.read_bytes() == b"hello" and target.exists()
    assert Location.resolve(f"s3://{BUCKET}/scratch", s3_server.endpoint).files() == ["note.txt"]


def test_missing_prefix_is_a_clear_error(s3_dataset, s3_server) -> None:  # noqa: ANN001
    with pytest.raises(DataError, match="no such folder or prefix"):
        list_images(Location.resolve(f"s3://{BUCKET}/does/not/exist", s3_server.endpoint))


def test_eda_on_s3(s3_dataset, s3_server, synth_data, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "eda"
    rc = cli_main(["eda", s3_dataset, "--s3-endpoint", s3_server.endpoint, "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert s3_dataset in printed
    report = json.loads((out / "eda.json").read_text())
    local = data.class_counts(data.discover(str(synth_data)))
    assert report["counts"] == local
    assert report["unreadable"] == []
    assert (out / "sample_grid.png").stat().st_size > 1000
    assert (out / "class_balance.png").stat().st_size > 1000
