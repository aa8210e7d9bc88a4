"""The one preprocessing: decode -> 8-bit grayscale -> resize -> (equalise) -> normalise.

Training evaluation, batch scoring and serving all call these functions with the model's own
`InputSpec` (from the registry or a bundle's manifest), so they cannot disagree.

Two halves, so the heavy part can run in Ray Data tasks and the cheap part next to the model:

- `load_image(data, path, spec)`: bytes -> `uint8[size, size]` (decode, channels, resize,
  equalise). Raises `DecodeError` (never anything else) for bad input.
- `to_tensor(images, spec)`: `uint8[N, size, size]` -> `float[N, C, size, size]` (scale,
  replicate channels, mean/std).

X-rays are grayscale; colour inputs (RGB, RGBA, palette, CMYK) are converted to luma, 16-bit
PNGs and DICOMs are windowed to 8 bits, and 3-channel models get the gray plane replicated.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RESIZE_MODES: tuple[str, ...] = ("squash", "letterbox", "center_crop")
EQUALIZE_MODES: tuple[str, ...] = ("none", "hist", "autocontrast")
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "DICOM")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; larger inputs are refused as decompression bombs

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class DecodeError(ValueError):
    """An input that cannot become a model input. `kind` is one of:
    `empty`, `corrupt`, `unsupported`, `too_large` (servers map these to 400/400/415/413);
    reading adds `missing` and `unreadable` (`pneumo.io.reading.KINDS`, the one vocabulary).
    """

    def __init__(self, path: str, kind: str, reason: str):
        self.path, self.kind, self.reason = path, kind, reason
        super().__init__(f"{path or '<bytes>'}: {reason}")


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square size, channels, normalisation and resize/equalise modes."""

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "squash"
    equalize: str = "none"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}: valid: 1, 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r}: valid: {', '.join(RESIZE_MODES)}")
        if self.equalize not in EQUALIZE_MODES:
            raise ValueError(f"equalize={self.equalize!r}: valid: {', '.join(EQUALIZE_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown input-spec keys {sorted(unknown)}; valid: {sorted(known)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def replace(self, **changes: Any) -> InputSpec:
        return InputSpec.from_dict({**self.to_dict(), **changes})


# ---------------------------------------------------------------- decode


def sniff_format(data: bytes, path: str = "") -> str | None:
    """'JPEG', 'PNG', 'DICOM' or None, from magic bytes (and a .dcm name for preamble-less DICOM)."""
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    if path.lower().endswith((".dcm", ".dicom")):
        return "DICOM"
    return None


_BLOCK = 1 << 20  # values windowed at a time: the float32 temporaries stay at a few MB


def _windowed(blocks: Any, n: int) -> np.ndarray:
    """Min-max window the values of `blocks()` (a fresh iterator of arrays per call) to a flat
    uint8 array of `n` values, one block at a time (a 64-megapixel 16-bit image never has a
    full-size float copy). Non-finite values count as `np.nan_to_num` makes them."""
    def extremes(fix: bool) -> tuple[float, float, bool]:
        lo, hi, finite = np.inf, -np.inf, True
        for b in blocks():
            f = np.nan_to_num(b.astype(np.float32)) if fix else b.astype(np.float32)
            if f.size:
                b_lo, b_hi = float(f.min()), float(f.max())  # NaN when the block has one
                finite = finite and np.isfinite(b_lo) and np.isfinite(b_hi)
                lo, hi = min(lo, b_lo), max(hi, b_hi)
        return lo, hi, finite

    lo, hi, finite = extremes(False)
    fix = not finite
    if fix:
        lo, hi, _ = extremes(True)
    if not hi > lo:
        return np.zeros(n, dtype=np.uint8)
    out, at, scale = np.empty(n, dtype=np.uint8), 0, 255.0 / (hi - lo)
    for b in blocks():
        f = b.astype(np.float32).reshape(-1)
        if fix:
            np.nan_to_num(f, copy=False)
        out[at:at + f.size] = np.clip((f - lo) * scale + 0.5, 0, 255)
        at += f.size
    return out


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max window any numeric array to uint8 (in blocks: no full-size float32 copies)."""
    arr = np.asarray(arr)
    if arr.size == 0:
        raise ValueError("no pixels")
    flat = np.ascontiguousarray(arr).reshape(-1)
    out = _windowed(lambda: (flat[s:s + _BLOCK] for s in range(0, flat.size, _BLOCK)), flat.size)
    return out.reshape(arr.shape)


def _image_to_uint8(img: Image.Image) -> Image.Image:
    """A 16/32-bit PIL image windowed to 8-bit gray, read in row strips (no full-size copy)."""
    w, h = img.size
    rows = max(1, _BLOCK // max(w, 1))
    strips = lambda: (np.asarray(img.crop((0, y, w, min(h, y + rows)))) for y in range(0, h, rows))  # noqa: E731
    return Image.fromarray(_windowed(strips, w * h).reshape(h, w), mode="L")


def _dicom_int(ds: Any, name: str, default: int) -> int:
    value = ds.get(name, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        return default


def _read_dicom(data: bytes, path: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """(first frame as a windowed array, PhotometricInterpretation) of a DICOM, or `DecodeError`.

    The pixel budget counts every frame and sample (frames x rows x columns x samples) and is
    checked from the header, before any pixel data is decoded; then only frame 0 is decoded.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise DecodeError(path, "corrupt", f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "SOPClassUID" in ds:  # a real DICOM object that is not an image (report, dose...)
            raise DecodeError(path, "unsupported", "DICOM without pixel data (not an image)")
        raise DecodeError(path, "corrupt", "not a readable DICOM file (no SOP class, no pixel data)")
    rows, cols = _dicom_int(ds, "Rows", 0), _dicom_int(ds, "Columns", 0)
    frames, samples = _dicom_int(ds, "NumberOfFrames", 1), _dicom_int(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0:
        raise DecodeError(path, "corrupt", f"DICOM header has no usable size ({cols}x{rows}, {frames} frame(s))")
    total = frames * rows * cols * samples
    if total > max_pixels:
        raise DecodeError(path, "too_large", f"{frames} frame(s) of {cols}x{rows}x{samples} = {total} values "
                          f"exceeds the limit of {max_pixels}")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    try:
        arr = pixel_array(ds, index=0 if frames > 1 else None)
        if arr.ndim == 4 or (arr.ndim == 3 and samples == 1):
            arr = arr[0]  # still multi-frame: first frame
        if arr.ndim == 3:  # colour DICOM: luma
            return arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32), photometric
        arr = apply_modality_lut(arr, ds)
        try:
            return apply_voi_lut(arr, ds), photometric
        except ValueError:  # a broken window (e.g. WindowWidth 0): fall back to min-max
            return arr, photometric
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(path, "corrupt", f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _decode_dicom(data: bytes, path: str, max_pixels: int) -> Image.Image:
    arr, photometric = _read_dicom(data, path, max_pixels)
    if arr.ndim != 2:
        raise DecodeError(path, "corrupt", f"DICOM pixel data has shape {arr.shape}, not one 2-D frame")
    gray = _to_uint8(arr)
    if photometric == "MONOCHROME1":
        np.subtract(255, gray, out=gray)
    return Image.fromarray(gray, mode="L")


def _alpha_on_black(img: Image.Image) -> Image.Image:
    """Gray of an image with alpha, composited on black: luma x alpha / 255, two 8-bit planes
    at a time (no full-size RGBA copies: a 4000x4000 RGBA PNG stays near its decoded 64 MB)."""
    alpha = img.getchannel("A")
    gray = img.convert("L") if img.mode != "LA" else img.getchannel("L")
    return ImageChops.multiply(gray, alpha)


def _to_gray(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _image_to_uint8(img)
    if mode in ("P", "PA"):
        if mode == "P" and "transparency" not in img.info:
            return img.convert("L")  # through the palette: one 8-bit plane, no RGB copy
        img = img.convert("RGBA")
        mode = img.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _alpha_on_black(img)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        img = img.convert("RGB")
    return img.convert("L")


_BYTES_PER_VALUE = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4, "1": 1}


def decoded_bytes(img: Image.Image) -> int:
    """Bytes the decoded image takes: pixels x bands x bytes per value."""
    w, h = img.size
    return w * h * len(img.getbands()) * _BYTES_PER_VALUE.get(img.mode, 1)


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos of films); a broken EXIF block is ignored."""
    try:
        if img.getexif().get(0x0112, 1) in (0, 1):  # no turn: skip exif_transpose's full copy
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - the pixels are fine even when the EXIF is not
        return img


def decode(
    data: bytes,
    path: str = "",
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Bytes of a JPEG, PNG or DICOM -> 8-bit grayscale PIL image. Raises only `DecodeError`.

    `draft_size` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding (never
    below `draft_size` on either side), which makes large originals several times cheaper.
    Budgets (checked from the header, before the pixels are decoded): `max_pixels` pixels
    (DICOM: values over every frame and sample), and `2 x max_pixels` bytes once decoded, so a
    16-bit image may have `max_pixels` pixels, an RGBA one half of that (a 70 KB 8000x8000 RGBA
    PNG would decode to 256 MB). EXIF orientation is applied.
    """
    if not data:
        raise DecodeError(path, "empty", "empty file (0 bytes)")
    fmt = sniff_format(data, path)
    if fmt is None:
        raise DecodeError(
            path, "unsupported", f"not a supported image (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    try:
        if fmt == "DICOM":
            return _decode_dicom(data, path, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(path, "too_large", f"{w}x{h} pixels exceeds the limit of {max_pixels}")
            if fmt == "JPEG" and draft_size and img.format == "JPEG":
                img.draft("L", (draft_size, draft_size))
            if decoded_bytes(img) > 2 * max_pixels:
                raise DecodeError(path, "too_large", f"{w}x{h} {img.mode} decodes to {decoded_bytes(img)} bytes, "
                                  f"over the limit of {2 * max_pixels}")
            img.load()
        return _to_gray(_exif_upright(img))
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(path, "too_large", f"decompression bomb refused ({exc})") from exc
    except MemoryError as exc:
        raise DecodeError(path, "too_large", "not enough memory to decode") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DecodeError(path, "corrupt", f"corrupt or truncated {fmt} ({exc})") from exc
    except Exception as exc:  # a decoder bug must still be a per-file error
        raise DecodeError(path, "corrupt", f"cannot decode {fmt} ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------- resize / equalise


def resize(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize a grayscale image to `spec.size` square by `spec.resize`."""
    size = spec.size
    if spec.resize == "squash":
        return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    w, h = img.size
    if spec.resize == "letterbox":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    scale = size / min(w, h)  # center_crop
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def equalize(img: Image.Image, mode: str) -> Image.Image:
    if mode == "none":
        return img
    if mode == "hist":
        return ImageOps.equalize(img)
    if mode == "autocontrast":
        return ImageOps.autocontrast(img, cutoff=1)
    raise ValueError(f"equalize={mode!r}: valid: {', '.join(EQUALIZE_MODES)}")


def equalize_array(gray: np.ndarray, mode: str) -> np.ndarray:
    """`equalize` on a `uint8[H, W]` array (training augmentation equalises after its own changes)."""
    if mode == "none":
        return gray
    return np.array(equalize(Image.fromarray(np.asarray(gray, dtype=np.uint8), mode="L"), mode), dtype=np.uint8)


def load_image(data: bytes, path: str, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> `uint8[spec.size, spec.size]`, the model-ready grayscale plane. Raises `DecodeError`."""
    img = decode(data, path, draft_size=spec.size, max_pixels=max_pixels)
    try:
        img = equalize(resize(img, spec), spec.equalize)
        return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)
    except Exception as exc:
        raise DecodeError(path, "corrupt", f"cannot resize ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------- normalise


def to_array(images: Any, spec: InputSpec) -> np.ndarray:
    """`uint8[N, H, W]` -> normalised `float32[N, C, H, W]` numpy array, without torch (the ONNX engines' input)."""
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected uint8[N, H, W], got shape {tuple(x.shape)}")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    plane = x[:, None].astype(np.float32) / np.float32(255.0)  # the same steps, in float32, as torch's path below
    return np.ascontiguousarray((np.broadcast_to(plane, (len(x), spec.channels, *x.shape[1:])) - mean) / std)


def to_tensor(images: Any, spec: InputSpec, device: Any = None, channels_last: bool = False):
    """`uint8[N, H, W]` (numpy or torch) -> normalised `float32[N, C, H, W]` torch tensor (on `device`)."""
    import torch

    if not isinstance(images, torch.Tensor) and (device is None or torch.device(device).type == "cpu"):
        x = torch.from_numpy(to_array(images, spec))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(images)))
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"expected uint8[N, H, W], got shape {tuple(x.shape)}")
    x = x.to(device=device, non_blocking=True).float().div_(255.0).unsqueeze(1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = (x.expand(-1, spec.channels, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
