"""Shift proxies for a new site, built from the published *train* split only (never its test split).

Every proxy is a set of labelled images rendered at a bundle's own input spec, so any bundle is
measured on it through its `Predictor` (the engine scoring and serving use). Two families:

- **held-out**: acquisition changes that no training augmentation imitates, so a recipe cannot
  have been trained on them:
  - `render448-squash|letterbox|crop`: the val patients' *originals* (`chest_xray_448`: decoded from
    the original files, Lanczos, aspect kept; a different acquisition chain than the 224 px set),
    through pneumo's decoder with the bundle's resize mode, then letterboxed (aspect kept, a
    different field of view) or centre-cropped (a tighter one);
  - `jpeg-q12`: every val image recompressed by another encoder at quality 12 (block artefacts);
  - `lowres-4x`: every val image downsampled 4x and back (a lower-resolution detector);
  - `sharpen`: a strong unsharp mask (an edge-enhancing reconstruction kernel);
- **in-augmentation** (training augmentations of the fine-tuning recipes cover the family, so a
  recipe trained on them is expected to do well; reported, but not used to choose alone):
  `blur-2px`, `noise-0.08`, `gamma-0.45|2.2` (exposure, with a grey window), `border-12`
  (collimation), `zoom-0.75` (a tighter field of view).

LOSO (leave one NORMAL acquisition series out) needs a training run per series and is built by
`ablate_external.py train --loso`.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

SHARED = os.environ.get("PNEUMO_SHARED_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
DATA = os.path.join(SHARED, "chest_xray_224")
DATA448 = os.path.join(SHARED, "chest_xray_448", "train")


@dataclass
class ProxySet:
    """Labelled images of one proxy at a bundle's spec."""

    name: str
    family: str  # "val" | "held-out" | "in-augmentation" | "loso"
    images: np.ndarray  # uint8[N, S, S]
    labels: np.ndarray  # 0 NORMAL / 1 PNEUMONIA
    groups: list[str]


def canonical_records() -> list:
    """The carve every pneumo run uses by default: patient-grouped val/test out of train, seed 0."""
    from pneumo.data.datasets import labelled_splits

    return labelled_splits(DATA, "binary", 0.1, 0.1, seed=0)


def series(path: str) -> str:
    from pneumo.data.datasets import acquisition_group

    return acquisition_group(path)


def _seed(path: str) -> int:
    return int.from_bytes(hashlib.sha256(os.path.basename(path).encode()).digest()[:4], "big")


def _render(data: bytes, path: str, spec, change: Callable[[Image.Image, str], Image.Image] | None) -> np.ndarray:
    """pneumo's load_image with `change` applied after the resize and before the equaliser."""
    from pneumo.io.preprocess import decode, equalize, resize

    img = resize(decode(data, path, draft_size=spec.size), spec)
    if change is not None:
        img = change(img, path)
    return np.array(equalize(img, spec.equalize), dtype=np.uint8)


def _jpeg(q: int) -> Callable[[bytes], bytes]:
    def recompress(data: bytes) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("L").save(buf, format="JPEG", quality=q)
        return buf.getvalue()

    return recompress


def _lowres(factor: int) -> Callable[[Image.Image, str], Image.Image]:
    def change(img: Image.Image, _path: str) -> Image.Image:
        w, h = img.size
        return img.resize((max(8, w // factor), max(8, h // factor)), Image.BOX).resize((w, h), Image.BILINEAR)

    return change


def _sharpen(img: Image.Image, _path: str) -> Image.Image:
    return img.filter(ImageFilter.UnsharpMask(radius=3, percent=250, threshold=0))


def _blur(img: Image.Image, _path: str) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(2.0))


def _noise(img: Image.Image, path: str) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) / 255 + np.random.default_rng(_seed(path)).normal(0, 0.08, img.size[::-1])
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")


def _gamma(img: Image.Image, path: str) -> Image.Image:
    g = 0.45 if _seed(path) % 2 else 2.2
    a = np.asarray(img, dtype=np.float32) / 255
    a = 0.08 + 0.84 * a**g  # and a grey window: lifted blacks, lowered whites
    return Image.fromarray((a * 255 + 0.5).astype(np.uint8), mode="L")


def _border(img: Image.Image, path: str) -> Image.Image:
    a = np.array(img)
    h, w = a.shape
    b = int(0.12 * min(h, w))
    side = _seed(path) % 4
    if side == 0:
        a[:b], a[-b:] = 0, 0
    elif side == 1:
        a[:, :b], a[:, -b:] = 0, 0
    else:
        a[:b], a[:, :b] = 0, 0
    return Image.fromarray(a, mode="L")


def _zoom(img: Image.Image, _path: str) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * 0.75), int(h * 0.75)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)).resize((w, h), Image.BILINEAR)


SYNTHETIC: dict[str, tuple[str, Callable | None, Callable | None]] = {  # name: (family, bytes change, image change)
    "jpeg-q12": ("held-out", _jpeg(12), None),
    "lowres-4x": ("held-out", None, _lowres(4)),
    "sharpen": ("held-out", None, _sharpen),
    "blur-2px": ("in-augmentation", None, _blur),
    "noise-0.08": ("in-augmentation", None, _noise),
    "gamma-0.45|2.2": ("in-augmentation", None, _gamma),
    "border-12": ("in-augmentation", None, _border),
    "zoom-0.75": ("in-augmentation", None, _zoom),
}


def build(spec, records: list | None = None, only: list[str] | None = None) -> list[ProxySet]:
    """val and every proxy at `spec` (only the names in `only`, when given)."""
    from pneumo.io.preprocess import load_image

    records = records or canonical_records()
    val = [r for r in records if r.split == "val"]
    y = np.array([r.label == "PNEUMONIA" for r in val], dtype=np.int64)
    groups = [series(r.path) for r in val]
    raw = [open(r.path, "rb").read() for r in val]
    out = [ProxySet("val", "val", np.stack([load_image(d, r.path, spec) for d, r in zip(raw, val)]), y, groups)]
    for name, (family, on_bytes, on_image) in SYNTHETIC.items():
        if only and name not in only:
            continue
        imgs = [_render(on_bytes(d) if on_bytes else d, r.path, spec, on_image) for d, r in zip(raw, val)]
        out.append(ProxySet(name, family, np.stack(imgs), y, groups))
    originals = [(r, os.path.join(DATA448, r.label, os.path.basename(r.path))) for r in val]
    originals = [(r, p) for r, p in originals if os.path.exists(p)]
    for mode in ("squash", "letterbox", "center_crop"):
        name = f"render448-{mode.replace('center_', '')}"
        if only and name not in only:
            continue
        s = spec.replace(resize=mode)
        imgs = np.stack([load_image(open(p, "rb").read(), p, s) for _, p in originals])
        out.append(ProxySet(name, "held-out", imgs, np.array([r.label == "PNEUMONIA" for r, _ in originals], np.int64),
                            [series(r.path) for r, _ in originals]))
    return out


def loso_set(spec, held_series: str, records: list | None = None) -> ProxySet:
    """Every NORMAL image (train + val) of the held-out series, and the val PNEUMONIA images: for a
    bundle trained without that series' NORMAL images (`ablate_external.py train --loso`)."""
    from pneumo.io.preprocess import load_image

    records = records or canonical_records()
    normal = [r for r in records if r.label == "NORMAL" and r.split in ("train", "val") and series(r.path) == held_series]
    pneumonia = [r for r in records if r.label == "PNEUMONIA" and r.split == "val"]
    chosen = normal + pneumonia
    imgs = np.stack([load_image(open(r.path, "rb").read(), r.path, spec) for r in chosen])
    return ProxySet(f"loso-{held_series.split()[0]}", "loso", imgs,
                    np.array([r.label == "PNEUMONIA" for r in chosen], np.int64), [series(r.path) for r in chosen])
