"""The one preprocessing: every image kind in, model-ready planes out; bad input is a DecodeError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import dicom_bytes
from PIL import Image

from pneumo.io.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeError,
    InputSpec,
    decode,
    load_image,
    sniff_format,
    to_tensor,
)

W, H = 120, 80
SPEC = InputSpec(size=64, channels=1, mean=(0.5,), std=(0.25,))


def gray_pattern(w: int = W, h: int = H) -> np.ndarray:
    """A horizontal 0..255 ramp with a dark square: full range, clear left/right orientation."""
    g = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    g[h // 4: h // 2, w // 8: w // 4] = 0
    return g


def encode(img: Image.Image, fmt: str, **kw) -> bytes:  # noqa: ANN003
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgba(g: np.ndarray) -> Image.Image:
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    return Image.fromarray(rgba)


def _palette(g: np.ndarray) -> Image.Image:
    img = Image.fromarray(g).convert("P")  # L -> P keeps a 256-gray palette: exact
    assert img.mode == "P"
    return img


def _i16(g: np.ndarray) -> Image.Image:
    img = Image.fromarray(g.astype(np.uint16) * 257)
    assert img.mode == "I;16"
    return img


# name -> (bytes, file name, lossless?)
def _kinds() -> dict[str, tuple[bytes, str, bool]]:
    g = gray_pattern()
    ramp12 = (g.astype(np.uint16) * 16)  # 0..4080
    rgb = Image.fromarray(np.dstack([g, g, g]))
    return {
        "jpeg_gray": (encode(Image.fromarray(g), "JPEG", quality=95), "a.jpeg", False),
        "jpeg_rgb": (encode(rgb, "JPEG", quality=95), "a.jpg", False),
        "jpeg_cmyk": (encode(rgb.convert("CMYK"), "JPEG", quality=95), "a.jpeg", False),
        "png_L": (encode(Image.fromarray(g), "PNG"), "a.png", True),
        "png_RGB": (encode(rgb, "PNG"), "a.png", True),
        "png_RGBA": (encode(_rgba(g), "PNG"), "a.png", True),
        "png_LA": (encode(Image.fromarray(np.dstack([g, np.full_like(g, 255)])), "PNG"), "a.png", True),
        "png_P": (encode(_palette(g), "PNG"), "a.png", True),
        "png_I16": (encode(_i16(g), "PNG"), "a.png", True),
        "dicom_mono2": (dicom_bytes(ramp12), "a.dcm", True),
        "dicom_mono2_no_preamble": (dicom_bytes(ramp12, preamble=False), "a.dcm", True),
    }


KINDS = _kinds()


def test_source_modes_are_what_the_table_says() -> None:
    modes = {name: Image.open(io.BytesIO(data)).mode for name, (data, _, _) in KINDS.items() if "dicom" not in name}
    assert modes == {"jpeg_gray": "L", "jpeg_rgb": "RGB", "jpeg_cmyk": "CMYK", "png_L": "L", "png_RGB": "RGB",
                     "png_RGBA": "RGBA", "png_LA": "LA", "png_P": "P", "png_I16": "I;16"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_decodes_to_the_same_gray_plane(kind: str) -> None:
    data, name, lossless = KINDS[kind]
    img = decode(data, name)
    assert img.mode == "L" and img.size == (W, H)
    out = np.asarray(img, dtype=np.int16)
    diff = np.abs(out - gray_pattern().astype(np.int16))
    assert diff.max() <= (1 if lossless else 12), f"{kind}: max diff {diff.max()}"
    assert diff.mean() <= (0.5 if lossless else 3)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("resize", ["squash", "letterbox", "center_crop"])
def test_load_image_shape_and_dtype(kind: str, resize: str) -> None:
    data, name, _ = KINDS[kind]
    spec = SPEC.replace(resize=resize)
    out = load_image(data, name, spec)
    assert out.shape == (spec.size, spec.size) and out.dtype == np.uint8
    assert out.max() > 200 and out.min() < 30  # content kept, not blank


def test_rgba_transparency_is_composited_on_black() -> None:
    g = np.full((H, W), 200, np.uint8)
    rgba = np.dstack([g, g, g, np.zeros_like(g)])
    rgba[:, W // 2:, 3] = 255
    out = np.asarray(decode(encode(Image.fromarray(rgba), "PNG"), "t.png"))
    assert out[:, : W // 2].max() == 0 and out[:, W // 2:].min() == 200


def test_resize_modes_place_the_image_differently() -> None:
    wide = np.zeros((100, 200), np.uint8)
    wide[:, 100:] = 255  # left half black, right half white
    data = encode(Image.fromarray(wide), "PNG")
    squash = load_image(data, "w.png", SPEC.replace(resize="squash"))
    letter = load_image(data, "w.png", SPEC.replace(resize="letterbox"))
    crop = load_image(data, "w.png", SPEC.replace(resize="center_crop"))
    assert squash[:, 40:].min() == 255 and squash[:, :24].max() == 0
    assert letter[:12].max() == 0 and letter[-12:].max() == 0  # bars above and below
    assert letter[32, 40:].min() == 255  # content in the middle band
    # center crop keeps the middle 100x100: half black, half white
    assert crop[:, :28].max() == 0 and crop[:, 36:].min() == 255


@pytest.mark.parametrize("mode", ["hist", "autocontrast"])
def test_equalize_stretches_low_contrast(mode: str) -> None:
    low = (gray_pattern() // 4 + 100).astype(np.uint8)  # 100..163
    data = encode(Image.fromarray(low), "PNG")
    plain = load_image(data, "l.png", SPEC)
    eq = load_image(data, "l.png", SPEC.replace(equalize=mode))
    assert int(plain.max()) - int(plain.min()) < 70
    assert int(eq.max()) - int(eq.min()) > 200


# ---------------------------------------------------------------- DICOM


def test_dicom_monochrome1_is_inverted_monochrome2() -> None:
    px = gray_pattern().astype(np.uint16) * 16
    m2 = np.asarray(decode(dicom_bytes(px, "MONOCHROME2"), "m2.dcm"), dtype=np.int16)
    m1 = np.asarray(decode(dicom_bytes(px, "MONOCHROME1"), "m1.dcm"), dtype=np.int16)
    assert m2[0, -1] == 255 and m2[0, 0] == 0  # bright where values are high
    assert np.abs(m1 - (255 - m2)).max() <= 1


def test_dicom_window_is_applied() -> None:
    px = np.tile(np.linspace(0, 4000, W).astype(np.uint16), (H, 1))
    full = np.asarray(decode(dicom_bytes(px), "full.dcm"))
    win = np.asarray(decode(dicom_bytes(px, window=(2000, 800)), "win.dcm"))
    col = np.linspace(0, 4000, W)
    below, above, inside = col < 1550, col > 2450, (col > 1700) & (col < 2300)
    assert win[:, below].max() == 0 and win[:, above].min() == 255  # clipped outside the window
    assert 0 < win[0, inside].min() < win[0, inside].max() < 255  # a ramp inside it
    assert np.all(np.diff(win[0].astype(int)) >= 0)
    # without a window the whole range is used: the middle is mid-gray, not clipped
    assert 100 < full[0, W // 2] < 160 and full[0, 0] == 0 and full[0, -1] == 255


def test_dicom_sniffed_by_magic_or_name() -> None:
    assert sniff_format(dicom_bytes(np.zeros((4, 4), np.uint16)), "noext") == "DICOM"
    assert sniff_format(dicom_bytes(np.zeros((4, 4), np.uint16), preamble=False), "x.dcm") == "DICOM"
    assert sniff_format(dicom_bytes(np.zeros((4, 4), np.uint16), preamble=False), "x.bin") is None


# ---------------------------------------------------------------- large JPEGs: draft mode


def test_large_jpeg_uses_draft_mode() -> None:
    big = np.asarray(Image.fromarray(gray_pattern()).resize((2000, 1600)))
    data = encode(Image.fromarray(big), "JPEG", quality=85)
    full = decode(data, "big.jpeg")
    draft = decode(data, "big.jpeg", draft_size=224)
    assert full.size == (2000, 1600)
    assert draft.size[0] < 1000 and draft.size[1] < 800  # decoded at 1/4 or 1/8 scale
    assert min(draft.size) >= 224  # never below the requested size
    out = load_image(data, "big.jpeg", InputSpec(size=224))
    assert out.shape == (224, 224)


# ---------------------------------------------------------------- bad input


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims `width` x `height` pixels."""
    data = bytearray(encode(Image.fromarray(np.zeros((2, 2), np.uint8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _bad_inputs() -> dict[str, tuple[bytes, str, str]]:
    rng = np.random.default_rng(0)
    jpeg = KINDS["jpeg_gray"][0]
    png = KINDS["png_L"][0]
    return {
        "empty": (b"", "empty.jpeg", "empty"),
        "jpeg_magic_random_bytes": (b"\xff\xd8\xff" + rng.bytes(2000), "random.jpeg", "corrupt"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "trunc.jpeg", "corrupt"),
        "truncated_png": (png[: len(png) // 2], "trunc.png", "corrupt"),
        "dicom_garbage": (b"\0" * 128 + b"DICM" + rng.bytes(300), "bad.dcm", "corrupt"),
        "text": (b"patient notes, not an image\n", "notes.jpeg", "unsupported"),
        "gif": (encode(Image.fromarray(gray_pattern()).convert("P"), "GIF"), "a.gif", "unsupported"),
        "bmp": (encode(Image.fromarray(gray_pattern()), "BMP"), "a.bmp", "unsupported"),
        "png_bomb_header": (_png_claiming(100_000, 100_000), "bomb.png", "too_large"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_decode_error_naming_the_file(case: str) -> None:
    data, name, kind = BAD[case]
    with pytest.raises(DecodeError) as info:
        load_image(data, f"/archive/{name}", SPEC)
    err = info.value
    assert err.kind == kind, f"{case}: {err}"
    assert err.path == f"/archive/{name}" and f"/archive/{name}" in str(err)
    assert err.reason


@pytest.mark.parametrize("kind", ["png_L", "jpeg_gray", "dicom_mono2"])
def test_max_pixels_refuses_too_large(kind: str) -> None:
    data, name, _ = KINDS[kind]
    with pytest.raises(DecodeError) as info:
        load_image(data, name, SPEC, max_pixels=W * H - 1)
    assert info.value.kind == "too_large"
    assert load_image(data, name, SPEC, max_pixels=W * H).shape == (64, 64)


# ---------------------------------------------------------------- to_tensor


def test_to_tensor_one_channel() -> None:
    imgs = np.stack([np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)])
    x = to_tensor(imgs, SPEC)
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor(-2.0)) and torch.allclose(x[1], torch.tensor(2.0))


def test_to_tensor_three_channels_imagenet() -> None:
    spec = InputSpec(size=8)  # 3 channels, ImageNet mean/std
    img = np.full((8, 8), 255, np.uint8)
    x = to_tensor(img, spec)  # a single 2-D image becomes a batch of one
    assert x.shape == (1, 3, 8, 8)
    for c in range(3):
        expected = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[0, c], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert to_tensor(torch.from_numpy(img[None]), spec, channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )


def test_to_tensor_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="expected uint8"):
        to_tensor(np.zeros((1, 1, 8, 8), np.uint8), SPEC)


@pytest.mark.parametrize("bad", [{"channels": 2}, {"resize": "stretch"}, {"equalize": "clahe"}, {"mean": (0.5, 0.5)}])
def test_input_spec_rejects_bad_values_listing_valid(bad: dict) -> None:
    with pytest.raises(ValueError, match="valid|need"):
        SPEC.replace(**bad)


def test_input_spec_dict_round_trip_and_unknown_keys() -> None:
    spec = InputSpec(size=96, channels=1, mean=(0.4,), std=(0.2,), resize="letterbox", equalize="hist")
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown input-spec keys"):
        InputSpec.from_dict({**spec.to_dict(), "colour": "gray"})
