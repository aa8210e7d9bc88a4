"""Helpers shared by test modules (import as `from helpers import ...`; tests/ is on sys.path)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch


def tiny_rows(n: int, size: int, num_classes: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows like the ingest's: {image: uint8[size, size], label: int}, labels cycling over classes."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (size, size), dtype=np.uint8), "label": i % num_classes}
            for i in range(n)]


class ListShard:
    """A stand-in for a Ray Data shard: `iter_torch_batches` over in-memory rows, in order."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def iter_torch_batches(self, batch_size: int, **_: Any):  # noqa: ANN201
        for i in range(0, len(self.rows), batch_size):
            chunk = self.rows[i:i + batch_size]
            yield {"image": torch.from_numpy(np.stack([r["image"] for r in chunk])),
                   "label": torch.tensor([r["label"] for r in chunk])}


def pretrained_available(model: str) -> bool:
    """Whether `model`'s pretrained weights are on this machine (pneumo never downloads them)."""
    from pneumo.models import get_spec
    from pneumo.weights import WeightsUnavailable, load_pretrained_state

    spec = get_spec(model)
    if not spec.has_pretrained:
        return False
    try:
        load_pretrained_state(spec)
    except WeightsUnavailable:
        return False
    return True


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", window: tuple[float, float] | None = None,
                preamble: bool = True, rows_cols: tuple[int, int] | None = None) -> bytes:
    """An uncompressed 16-bit DICOM of `pixels` (uint16), built with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows_cols or pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()
