"""Synthetic chest-like X-rays for the demo and the tests (never for real conclusions).

`synthesize(out, n)` writes deterministic 8-bit grayscale JPEGs in the labelled layout
`OUT/<split>/{NORMAL,PNEUMONIA}/` with Kermany-style names, so `pneumo.data` treats them like the
real data set:

- NORMAL: `IM-0001-0001.jpeg`, `NORMAL2-IM-0002-0001.jpeg` (patient `IM-0001`, image 1);
- PNEUMONIA: `person12_bacteria_31.jpeg`, `person13_virus_32.jpeg` (patient `person12`).

Many patients have several images (same anatomy, small shifts). Each image shows a body with two
dark lung fields, a spine, a heart shadow, ribs and film noise; geometry and exposure vary per
patient. PNEUMONIA adds bright opacities inside the lungs: bacterial cases one or two dense,
focal (lobar) consolidations on one side, viral cases a bilateral diffuse haze with many small
patches, so both the binary and the three-class task are learnable even at 64 px.

    pneumo synth OUT --n 200 [--seed 0] [--min-size 1000 --max-size 2000] [--splits train,val,test]

Acquisition shift (for drift tests; all off by default, and then the files are byte-identical to
before): `--contrast 0.6` (scale grey levels around the image mean), `--brightness 0.1` (add, in
[0, 1] units), `--gamma 1.5`, `--blur 0.01` (Gaussian sigma as a share of the width), `--crop 0.8`
(keep the central 80 % of each side: a tighter collimation / zoom) and `--noise 0.05` (added Gaussian
noise, in [0, 1] units). A prevalence shift is `--pneumonia-frac`.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pneumo.config import ConfigError, parse_config
from pneumo.data.datasets import SPLITS

# Share of patients per split when several splits are asked for (renormalised over those asked).
SPLIT_WEIGHTS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
IMAGES_PER_PATIENT: tuple[tuple[int, ...], tuple[float, ...]] = ((1, 2, 3), (0.55, 0.3, 0.15))


@dataclass(frozen=True)
class _Patient:
    index: int
    label: str  # NORMAL | PNEUMONIA
    cause: str | None  # bacteria | virus for PNEUMONIA
    n_images: int
    split: str = "train"


@dataclass(frozen=True)
class _Job:
    index: int
    patient: _Patient
    rel_path: str


# ---------------------------------------------------------------- plan


def _plan(n: int, seed: int, splits: tuple[str, ...], pneumonia_frac: float, bacteria_frac: float) -> list[_Job]:
    """Patients, their images and file names, decided before any pixel is drawn."""
    rng = np.random.default_rng([seed, 7001])
    counts, p = IMAGES_PER_PATIENT
    n_pneu = int(round(n * pneumonia_frac))
    patients: list[_Patient] = []
    for label, total in (("NORMAL", n - n_pneu), ("PNEUMONIA", n_pneu)):
        left = total
        while left > 0:
            k = min(left, int(rng.choice(counts, p=p)))
            cause = None if label == "NORMAL" else ("bacteria" if rng.random() < bacteria_frac else "virus")
            patients.append(_Patient(len(patients), label, cause, k))
            left -= k
    patients = _assign_splits(patients, splits, rng)

    jobs: list[_Job] = []
    im_no = normal2_no = person_no = 0
    pneu_image_no = 0
    for pat in patients:
        if pat.label == "NORMAL":
            if rng.random() < 0.5:
                im_no += 1
                stem = f"IM-{im_no:04d}"
            else:
                normal2_no += 1
                stem = f"NORMAL2-IM-{normal2_no:04d}"
            names = [f"{stem}-{i + 1:04d}.jpeg" for i in range(pat.n_images)]
        else:
            person_no += 1
            names = []
            for _ in range(pat.n_images):
                pneu_image_no += 1
                names.append(f"person{person_no}_{pat.cause}_{pneu_image_no}.jpeg")
        for name in names:
            jobs.append(_Job(len(jobs), pat, f"{pat.split}/{pat.label}/{name}"))
    return jobs


def _assign_splits(patients: list[_Patient], splits: tuple[str, ...], rng: np.random.Generator) -> list[_Patient]:
    if len(splits) == 1:
        return [_replace_split(p, splits[0]) for p in patients]
    weights = np.array([SPLIT_WEIGHTS[s] for s in splits])
    edges = np.cumsum(weights / weights.sum())
    out = list(patients)
    for label in ("NORMAL", "PNEUMONIA"):
        idx = [p.index for p in patients if p.label == label]
        order = rng.permutation(len(idx))
        for rank, j in enumerate(order):
            pos = (rank + 0.5) / len(idx)
            split = splits[int(np.searchsorted(edges, pos))]
            out[idx[j]] = _replace_split(patients[idx[j]], split)
    return out


def _replace_split(p: _Patient, split: str) -> _Patient:
    return _Patient(p.index, p.label, p.cause, p.n_images, split)


# ---------------------------------------------------------------- drawing


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ellipse(X, Y, cx, cy, ax, ay, softness):  # noqa: ANN001
    """Soft ellipse mask in [0, 1]; `softness` is the edge width in normalised units."""
    r = np.sqrt(((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2)
    return _sigmoid((1.0 - r) * min(ax, ay) / softness)


def _blobs(X, Y, centers: np.ndarray, sigmas: np.ndarray, amps: np.ndarray) -> np.ndarray:  # noqa: ANN001
    out = np.zeros(np.broadcast_shapes(X.shape, Y.shape), dtype=np.float32)
    for (cx, cy), s, a in zip(centers, sigmas, amps):
        out += a * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2.0 * s * s))
    return out


def _patient_geometry(seed: int, patient: _Patient, size_range: tuple[int, int]) -> dict:
    r = np.random.default_rng([seed, 7002, patient.index])
    lo, hi = size_range
    width = int(r.integers(lo, hi + 1))
    height = int(np.clip(width * r.uniform(0.8, 1.2), lo, hi))
    return {
        "width": width,
        "height": height,
        "body_cx": r.uniform(0.47, 0.53),
        "body_ax": r.uniform(0.36, 0.46),
        "lung_dx": r.uniform(0.14, 0.19),
        "lung_cy": r.uniform(0.45, 0.52),
        "lung_ax": r.uniform(0.10, 0.135),
        "lung_ay": r.uniform(0.22, 0.29),
        "heart": r.uniform(0.08, 0.12),
        "bg": r.uniform(0.02, 0.12),
        "body": r.uniform(0.55, 0.72),
        "lung": r.uniform(0.12, 0.24),
        "rib_period": r.uniform(0.055, 0.075),
        "rib_amp": r.uniform(0.04, 0.08),
        "gamma": r.uniform(0.85, 1.2),
    }


def render(seed: int, job: _Job, size_range: tuple[int, int]) -> Image.Image:
    """Draw one synthetic X-ray (8-bit grayscale PIL image) for `job`, deterministically."""
    g = _patient_geometry(seed, job.patient, size_range)
    r = np.random.default_rng([seed, 7003, job.index])
    W, H = g["width"], g["height"]
    work = max(W // 4, min(W, 192))  # draw at a low resolution, upsample (fast, and smooth like film)
    w, h = work, max(1, round(work * H / W))
    X = (np.arange(w, dtype=np.float32) / w)[None, :]
    Y = (np.arange(h, dtype=np.float32) / h)[:, None]

    dx, dy, zoom = r.uniform(-0.02, 0.02), r.uniform(-0.02, 0.02), r.uniform(0.97, 1.03)
    cx, cy = g["body_cx"] + dx, g["lung_cy"] + dy
    lung_ax, lung_ay, lung_dx = g["lung_ax"] * zoom, g["lung_ay"] * zoom, g["lung_dx"] * zoom

    body = _ellipse(X, Y, cx, 0.62 + dy, g["body_ax"] * zoom, 0.62, 0.02)
    neck = _ellipse(X, Y, cx, 0.02 + dy, 0.07, 0.12, 0.015)
    body = np.maximum(body, neck)
    lungs = np.maximum(
        _ellipse(X, Y, cx - lung_dx, cy, lung_ax, lung_ay, 0.012),
        _ellipse(X, Y, cx + lung_dx, cy + 0.01, lung_ax * 0.95, lung_ay * 0.97, 0.012),
    )
    heart = _ellipse(X, Y, cx - 0.02, cy + 0.14, g["heart"] * zoom, g["heart"] * 0.85 * zoom, 0.02)
    spine = _sigmoid((0.03 - np.abs(X - cx)) / 0.006) * (Y > 0.05)
    rib_phase = (Y - 0.35 * (X - cx) ** 2 - dy) / g["rib_period"]
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * rib_phase)) ** 6

    img = g["bg"] + (g["body"] - g["bg"]) * body
    img = img - (g["body"] - g["lung"]) * lungs * (1 - 0.5 * heart)
    img = img + g["rib_amp"] * ribs * lungs + 0.18 * spine * body * (1 - 0.5 * lungs) + 0.04 * heart

    if job.patient.label == "PNEUMONIA":
        img = img + _opacities(X, Y, r, job.patient.cause, cx, cy, lung_dx, lung_ax, lung_ay) * lungs

    img = img + r.normal(0.0, r.uniform(0.015, 0.03), size=img.shape).astype(np.float32)
    img = np.clip(img * r.uniform(0.95, 1.05) + r.uniform(-0.03, 0.03), 0, 1) ** g["gamma"]
    small = Image.fromarray((img * 255 + 0.5).astype(np.uint8))
    return small.resize((W, H), Image.BICUBIC)


def _opacities(X, Y, r: np.random.Generator, cause, cx, cy, lung_dx, lung_ax, lung_ay) -> np.ndarray:  # noqa: ANN001
    """Bright pneumonia opacities (before the lung mask): focal lobar or diffuse bilateral."""
    if cause == "bacteria":
        side = r.choice([-1.0, 1.0])
        k = int(r.integers(1, 3))
        centers = np.stack([
            cx + side * lung_dx + r.uniform(-0.4, 0.4, k) * lung_ax,
            cy + r.uniform(-0.1, 0.6, k) * lung_ay,
        ], axis=1)
        return _blobs(X, Y, centers, r.uniform(0.06, 0.09, k), r.uniform(0.4, 0.55, k))
    k = int(r.integers(14, 26))
    sides = r.choice([-1.0, 1.0], k)
    centers = np.stack([
        cx + sides * lung_dx + r.uniform(-0.8, 0.8, k) * lung_ax,
        cy + r.uniform(-0.8, 0.8, k) * lung_ay,
    ], axis=1)
    haze = r.uniform(0.15, 0.22)
    return haze + _blobs(X, Y, centers, r.uniform(0.015, 0.03, k), r.uniform(0.12, 0.22, k))


# ---------------------------------------------------------------- acquisition shift


@dataclass(frozen=True)
class Acquisition:
    """A change of scanner/protocol applied to the finished image; the defaults change nothing."""

    contrast: float = 1.0
    brightness: float = 0.0
    gamma: float = 1.0
    blur: float = 0.0  # Gaussian sigma as a share of the image width
    crop: float = 1.0  # share of each side kept (centred), then resized back
    noise: float = 0.0  # sigma of added Gaussian noise, [0, 1] grey units

    def validate(self) -> None:
        if self.contrast <= 0 or self.gamma <= 0 or self.blur < 0 or self.noise < 0 or not 0.1 <= self.crop <= 1:
            raise ValueError(f"{self}: need contrast > 0, gamma > 0, blur >= 0, noise >= 0, 0.1 <= crop <= 1")

    @property
    def is_identity(self) -> bool:
        return self == Acquisition()


def acquire(img: Image.Image, acq: Acquisition, seed: int, index: int) -> Image.Image:
    """Apply `acq` to one rendered image (deterministic: noise is drawn from `seed` and `index`)."""
    if acq.is_identity:
        return img
    W, H = img.size
    if acq.crop < 1:
        cw, ch = max(1, round(W * acq.crop)), max(1, round(H * acq.crop))
        left, top = (W - cw) // 2, (H - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((W, H), Image.BICUBIC)
    if acq.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=acq.blur * W))
    x = np.asarray(img, dtype=np.float32) / 255.0
    if acq.contrast != 1.0:
        x = (x - x.mean()) * acq.contrast + x.mean()
    x = np.clip(x + acq.brightness, 0, 1) ** acq.gamma
    if acq.noise > 0:
        x = x + np.random.default_rng([seed, 7004, index]).normal(0.0, acq.noise, size=x.shape).astype(np.float32)
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


# ---------------------------------------------------------------- writing


def synthesize(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size_range: tuple[int, int] = (1000, 2000),
    splits: tuple[str, ...] = ("train",),
    pneumonia_frac: float = 0.6,
    bacteria_frac: float = 0.5,
    quality: int = 90,
    workers: int | None = None,
    acquisition: Acquisition | None = None,
) -> list[Path]:
    """Write `n` synthetic X-rays under `out/<split>/<CLASS>/`; returns their paths.

    The same arguments always give the same files, byte for byte. With several `splits`,
    patients (never single images) are shared out over them, 70/15/15 for train/val/test.
    Files already in `out` under other names are left alone: use an empty folder.
    `acquisition` shifts contrast/brightness/gamma/blur/crop/noise after drawing (drift tests).
    """
    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    lo, hi = size_range
    if not 16 <= lo <= hi:
        raise ValueError(f"size_range={size_range}: need 16 <= min <= max")
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits}: give distinct splits from {', '.join(SPLITS)}")
    if not 0 <= pneumonia_frac <= 1 or not 0 <= bacteria_frac <= 1:
        raise ValueError("pneumonia_frac and bacteria_frac must be in [0, 1]")
    acq = acquisition or Acquisition()
    acq.validate()
    root = Path(out)
    jobs = _plan(n, seed, tuple(splits), pneumonia_frac, bacteria_frac)
    for folder in {str(Path(j.rel_path).parent) for j in jobs}:
        (root / folder).mkdir(parents=True, exist_ok=True)

    def write(job: _Job) -> Path:
        buf = io.BytesIO()
        acquire(render(seed, job, (lo, hi)), acq, seed, job.index).save(buf, format="JPEG", quality=quality)
        path = root / job.rel_path
        path.write_bytes(buf.getvalue())
        return path

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
        return list(pool.map(write, jobs))


# ---------------------------------------------------------------- CLI


@dataclass
class SynthConfig:
    """Write deterministic synthetic chest-like X-rays in the labelled layout."""

    out: str = field(metadata={"positional": True, "help": "output folder"})
    n: int = field(default=200, metadata={"help": "number of images"})
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same bytes)"})
    min_size: int = field(default=1000, metadata={"help": "smallest side length in pixels"})
    max_size: int = field(default=2000, metadata={"help": "largest side length in pixels"})
    splits: list[str] = field(default_factory=lambda: ["train"], metadata={"help": "splits to write, e.g. train,val,test"})
    pneumonia_frac: float = field(default=0.6, metadata={"help": "share of PNEUMONIA images"})
    bacteria_frac: float = field(default=0.5, metadata={"help": "share of bacterial among PNEUMONIA patients"})
    quality: int = field(default=90, metadata={"help": "JPEG quality"})
    contrast: float = field(default=1.0, metadata={"help": "acquisition shift: grey-level contrast factor"})
    brightness: float = field(default=0.0, metadata={"help": "acquisition shift: added brightness, [0, 1] units"})
    gamma: float = field(default=1.0, metadata={"help": "acquisition shift: gamma on [0, 1] grey levels"})
    blur: float = field(default=0.0, metadata={"help": "acquisition shift: Gaussian blur sigma, share of width"})
    crop: float = field(default=1.0, metadata={"help": "acquisition shift: central share of each side kept"})
    noise: float = field(default=0.0, metadata={"help": "acquisition shift: added Gaussian noise sigma"})

    def acquisition(self) -> Acquisition:
        return Acquisition(self.contrast, self.brightness, self.gamma, self.blur, self.crop, self.noise)

    def validate(self) -> None:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ConfigError(f"splits: {bad or self.splits} not valid; choose from {', '.join(SPLITS)}")
        if self.n < 1 or not 16 <= self.min_size <= self.max_size:
            raise ConfigError("need n >= 1 and 16 <= min_size <= max_size")
        try:
            self.acquisition().validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SynthConfig, argv, prog="pneumo synth")
    paths = synthesize(
        cfg.out, cfg.n, seed=cfg.seed, size_range=(cfg.min_size, cfg.max_size), splits=tuple(cfg.splits),
        pneumonia_frac=cfg.pneumonia_frac, bacteria_frac=cfg.bacteria_frac, quality=cfg.quality,
        acquisition=cfg.acquisition(),
    )
    counts: dict[str, int] = {}
    for p in paths:
        key = f"{p.parent.parent.name}/{p.parent.name}"
        counts[key] = counts.get(key, 0) + 1
    print(f"wrote {len(paths)} images to {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0
