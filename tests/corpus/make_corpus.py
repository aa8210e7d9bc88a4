"""The bad-input corpus: every kind of file an archive of X-rays can hold, generated at test time.

    cases = make_corpus(folder)        # writes the files, returns {name: Case}
    python tests/corpus/make_corpus.py /tmp/corpus   # the same, to look at

No binaries are committed: each kind is made here with Pillow, pydicom and the pylibjpeg
encoders, or copied from the test files that ship inside pydicom (compressed transfer syntaxes
that nothing here can encode: JPEG Lossless, JPEG-LS). Each `Case` says what must happen:

- `decode`: `pneumo.preprocess.load_image` on the bytes -> "ok" or the `DecodeError` kind
  (None: a file-system kind with no bytes of its own, e.g. a dangling symlink);
- `row`: the `error_kind` of its one batch-scoring row ("ok" for a scored row; None: not listed);
- `http`: the status of `POST /v1/predict` with the bytes as application/octet-stream under the
  serve tests' limits (4 M pixels); None: not posted (no bytes, or a duplicate of another kind).

Root and permissions: tests run as root, and `chmod 000` does not stop root from reading, so
`unreadable_perm` expects "ok" as root and `unreadable` otherwise; `symlink_loop` (ELOOP) is the
unreadable entry that fails for every user.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SERVE_MAX_PIXELS = 4_000_000
UID_NAME = "1.2.826.0.1.3680043.8.498.10293847561029384756"
NON_UTF8_NAME = b"patient_\xff\xfe_scan.png"  # not valid UTF-8
LONG_NAME = "p" * 246 + ".png"  # 250 characters


@dataclass(frozen=True)
class Case:
    rel: str  # file name under the corpus folder (escaped form for the non-UTF-8 one)
    decode: str | None
    row: str | None
    http: int | None
    note: str = ""


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:  # noqa: ANN003
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(w: int = 120, h: int = 80) -> np.ndarray:
    """A left-to-right ramp with a dark square in the upper left: orientation is visible."""
    g = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    g[h // 8: h // 3, w // 10: w // 4] = 0
    return g


def png_claiming(width: int, height: int, mode: str = "L") -> bytes:
    """A tiny PNG whose IHDR (valid CRC) claims `width` x `height` pixels of `mode`."""
    data = bytearray(_encode(Image.new(mode, (2, 2)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def rgba_bomb_png(side: int = 4000) -> bytes:
    """A small PNG (tens of KB) that decodes to side x side RGBA (64 MB at 4000)."""
    img = Image.new("RGBA", (side, side), (40, 90, 160, 200))
    img.paste((200, 200, 200, 255), (side // 4, side // 4, side // 2, side // 2))
    return _encode(img, "PNG", optimize=True)


def exif_rotated_jpeg() -> bytes:
    """A 120x80 JPEG stored sideways with EXIF Orientation 6: upright it is 80 wide, 120 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(pattern()), "JPEG", quality=95, exif=exif.tobytes())


def dicom(pixels: np.ndarray | None, *, frames: int | None = None, photometric: str = "MONOCHROME2",
          syntax: str | None = None, bits: int = 8, **attrs) -> bytes:  # noqa: ANN003
    """A DICOM file (with preamble) of `pixels` (rows, cols[, 3]) or (frames, rows, cols[, 3])."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    sop_class, sop_uid = SecondaryCaptureImageStorage, generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.update({"MediaStorageSOPClassUID": sop_class, "MediaStorageSOPInstanceUID": sop_uid,
                         "TransferSyntaxUID": ExplicitVRLittleEndian})
    ds.update({"SOPClassUID": sop_class, "SOPInstanceUID": sop_uid, "Modality": "CR", "PatientID": "ANON"})
    if pixels is not None:
        rgb = photometric == "RGB"
        shape = pixels.shape[1:] if frames else pixels.shape
        ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
        ds.SamplesPerPixel = 3 if rgb else 1
        if rgb:
            ds.PlanarConfiguration = 0
        if frames:
            ds.NumberOfFrames = frames
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.PixelData = pixels.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    if syntax is not None:
        from pydicom.uid import UID

        target = UID(syntax)
        if target.name.startswith("High-Throughput"):  # openjpeg encodes no HT blocks: a Part-1
            ds.compress("1.2.840.10008.1.2.4.90", encoding_plugin="pylibjpeg")  # J2K codestream
            ds.file_meta.TransferSyntaxUID = target  # under the HTJ2K syntax (decoder path test)
        else:
            ds.compress(target, encoding_plugin="pylibjpeg" if "2000" in target.name else "")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _shipped(name: str) -> bytes:
    """A test file that ships inside pydicom (no download)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} does not ship with the installed pydicom")
    return Path(path).read_bytes()


@functools.cache
def byte_kinds() -> dict[str, tuple[str, bytes, str, str, int]]:
    """name -> (file name, bytes, decode outcome, row outcome, HTTP status)."""
    rng = np.random.default_rng(11)
    g = pattern()
    rgb = Image.fromarray(np.dstack([g, g // 2, 255 - g]))
    jpeg = _encode(Image.fromarray(g), "JPEG", quality=90)
    png = _encode(Image.fromarray(g), "PNG")
    ramp12 = (np.arange(64 * 48).reshape(64, 48) % 4096).astype(np.uint16)
    frames_rgb = rng.integers(0, 255, (3, 40, 50, 3), dtype=np.uint8)
    frames_200 = np.repeat((pattern(64, 64) // 64 * 64)[None], 200, axis=0)  # runs: RLE-friendly
    gif_frames = [Image.fromarray(np.roll(g, 10 * i, axis=1)).convert("P") for i in range(3)]
    tiff_frames = [Image.fromarray(np.roll(g, 10 * i, axis=0)) for i in range(3)]
    from pydicom.uid import HTJ2KLossless, JPEG2000Lossless, RLELossless

    ok, good = "ok", 200
    return {
        # the good ones (also the "real good images" of the scoring run)
        "good_jpeg": ("good.jpeg", jpeg, ok, ok, good),
        "good_png": ("good.png", png, ok, ok, good),
        "good_dicom": ("good.dcm", dicom(ramp12, bits=16), ok, ok, good),
        # broken bytes
        "empty": ("empty.png", b"", "empty", "empty", 400),
        "truncated_jpeg": ("truncated.jpeg", jpeg[: len(jpeg) // 2], "corrupt", "corrupt", 400),
        "truncated_png": ("truncated.png", png[: len(png) // 2], "corrupt", "corrupt", 400),
        "renamed_text": ("notes.jpeg", b"patient notes, not an image\n", "unsupported", "unsupported", 415),
        "noise": ("noise.png", rng.bytes(4096), "unsupported", "unsupported", 415),
        "noise_jpeg_magic": ("noise.jpg", b"\xff\xd8\xff" + rng.bytes(4096), "corrupt", "corrupt", 400),
        # modes
        "cmyk_jpeg": ("cmyk.jpeg", _encode(rgb.convert("CMYK"), "JPEG", quality=90), ok, ok, good),
        "png_16bit": ("gray16.png", _encode(Image.fromarray(g.astype(np.uint16) * 257), "PNG"), ok, ok, good),
        "png_palette": ("palette.png", _encode(Image.fromarray(g).convert("P"), "PNG"), ok, ok, good),
        "png_palette_transparency": ("palette_t.png", _encode(rgb.convert("P"), "PNG", transparency=0), ok, ok, good),
        "png_la": ("la.png", _encode(Image.fromarray(np.dstack([g, np.full_like(g, 200)])), "PNG"), ok, ok, good),
        "png_rgba": ("rgba.png", _encode(rgb.convert("RGBA"), "PNG"), ok, ok, good),
        # sizes
        "png_1x1": ("one.png", _encode(Image.new("L", (1, 1), 128), "PNG"), ok, ok, good),
        "png_60000_header": ("huge_header.png", png_claiming(60000, 60000), "too_large", "too_large", 413),
        "png_rgba_4000_bomb": ("rgba_4000.png", rgba_bomb_png(4000), ok, ok, 413),
        "png_rgba_8000_header": ("rgba_8000.png", png_claiming(8000, 8000, "RGBA"), "too_large", "too_large", 413),
        # JPEG variants
        "jpeg_progressive": ("progressive.jpeg", _encode(Image.fromarray(g), "JPEG", progressive=True), ok, ok, good),
        "jpeg_exif_rotated": ("rotated.jpeg", exif_rotated_jpeg(), ok, ok, good),
        # other formats
        "gif_animated": ("animated.gif", _encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]),
                         "unsupported", "unsupported", 415),
        "tiff_multiframe": ("pages.tiff", _encode(tiff_frames[0], "TIFF", save_all=True,
                                                   append_images=tiff_frames[1:]), "unsupported", "unsupported", 415),
        "bmp": ("scan.bmp", _encode(Image.fromarray(g), "BMP"), "unsupported", "unsupported", 415),
        # DICOM variants
        "dicom_multiframe_rgb": ("multi_rgb.dcm", dicom(frames_rgb, frames=3, photometric="RGB"), ok, ok, good),
        "dicom_rle_200_frames": ("rle200.dcm", dicom(frames_200, frames=200, syntax=RLELossless), ok, ok, good),
        "dicom_no_pixel_data": ("report.dcm", dicom(None), "unsupported", "unsupported", 415),
        "dicom_window_width_0": ("ww0.dcm", dicom(ramp12, bits=16, WindowCenter=100, WindowWidth=0), ok, ok, good),
        "dicom_monochrome1": ("mono1.dcm", dicom(ramp12, bits=16, photometric="MONOCHROME1"), ok, ok, good),
        "dicom_extensionless_uid": (UID_NAME, dicom(ramp12, bits=16), ok, ok, good),
        "dicom_frames_over_budget": ("frames_bomb.dcm", dicom(np.zeros((4, 4), np.uint8), Rows=512, Columns=512,
                                                              NumberOfFrames=1000), "too_large", "too_large", 413),
        "dicom_truncated": ("truncated.dcm", dicom(ramp12, bits=16)[:-2000], "corrupt", "corrupt", 400),
        "dicom_jpeg_lossless": ("jpeg_lossless.dcm", _shipped("SC_rgb_jpeg_gdcm.dcm"), ok, ok, good),
        "dicom_jpeg_ls": ("jpeg_ls.dcm", _shipped("MR_small_jpeg_ls_lossless.dcm"), ok, ok, good),
        "dicom_jpeg2000": ("j2k.dcm", dicom(ramp12, bits=16, syntax=JPEG2000Lossless), ok, ok, good),
        "dicom_htj2k": ("htj2k.dcm", dicom(ramp12, bits=16, syntax=HTJ2KLossless), ok, ok, good),
        "dicom_rle_rgb_shipped": ("rle_rgb.dcm", _shipped("SC_rgb_rle_2frame.dcm"), ok, ok, good),
    }


def make_corpus(root: str | os.PathLike) -> dict[str, Case]:
    """Write every kind into `root` (created); returns name -> Case."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}
    for name, (rel, blob, dec, row, http) in byte_kinds().items():
        (root / rel).write_bytes(blob)
        cases[name] = Case(rel, dec, row, http)
    good = (root / "good.png").read_bytes()
    # file-system kinds: what the bytes are is not the point (not posted to the server)
    (root / "linked.png").symlink_to("good.png")
    cases["symlink"] = Case("linked.png", None, "ok", None)
    (root / "dangling.png").symlink_to("deleted-long-ago.png")
    cases["dangling_symlink"] = Case("dangling.png", None, "missing", None)
    (root / "loop_a.png").symlink_to("loop_b.png")
    (root / "loop_b.png").symlink_to("loop_a.png")
    cases["symlink_loop_a"] = Case("loop_a.png", None, "unreadable", None)
    cases["symlink_loop_b"] = Case("loop_b.png", None, "unreadable", None)
    (root / "a_folder").mkdir()
    (root / "a_folder" / "inside.png").write_bytes(good)
    cases["nested"] = Case("a_folder/inside.png", None, "ok", None)
    (root / "folder_link").symlink_to("a_folder")
    cases["symlink_to_folder"] = Case("folder_link", None, "unsupported", None, "listed, not followed")
    perm = root / "no_permission.png"
    perm.write_bytes(good)
    perm.chmod(0)
    cases["unreadable_perm"] = Case(perm.name, None, "ok" if os.geteuid() == 0 else "unreadable", None,
                                    "root reads it anyway")
    raw = os.path.join(os.fsencode(root), NON_UTF8_NAME)
    with open(raw, "wb") as f:
        f.write(good)
    cases["non_utf8_name"] = Case(NON_UTF8_NAME.decode("utf-8", "backslashreplace"), None, "ok", None)
    (root / LONG_NAME).write_bytes(good)
    cases["long_name_250"] = Case(LONG_NAME, None, "ok", None)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    cases["hidden_ds_store"] = Case(".DS_Store", None, None, None, "hidden: not listed")
    return cases


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    for name, case in make_corpus(sys.argv[1] if len(sys.argv) > 1 else "corpus").items():
        print(f"{name:28s} {case.rel[:40]:40s} decode={case.decode} row={case.row} http={case.http}")
