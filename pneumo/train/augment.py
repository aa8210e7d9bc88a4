"""On-the-fly training augmentation of `uint8[N, S, S]` grayscale batches (training only).

Two families, both run in the Ray Train worker on the shared preprocessing's output
(`pneumo.io.preprocess.load_image`) and before `pneumo.io.preprocess.to_tensor`, so evaluation,
scoring and serving never see them:

- **geometry**, as R2/R4/R5 used (Keras `ImageDataGenerator(rotation_range, width/height_shift_range,
  zoom_range, horizontal_flip)`): rotation, shift, zoom and an optional horizontal flip, one affine
  warp per image (`torchvision.transforms.v2.functional.affine`);
- **acquisition**, aimed at what changes from one X-ray chain to another: exposure (gamma) and the
  grey-level window (lifted blacks, lowered whites), blur or sharpening, sensor noise, the field of
  view (a random crop with a new aspect ratio, resized back) and collimation-like dark borders.

The acquisition family acts on the image *before* intensity equalisation: equalising first would
undo every monotone exposure change. When the model's input spec equalises (`equalize: hist`),
training ingest keeps the train split un-equalised (`Augment.raw_spec`) and `Augment.__call__`
equalises each image after the augmentations, with the same `pneumo.io.preprocess.equalize`.

    aug = Augment(gamma=1.6, window=0.1, blur=1.2, noise=0.03, crop=0.8, aspect=1.2, border=0.08)
    batch = aug(batch_uint8, generator, equalize="hist")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from pneumo.io.preprocess import InputSpec, equalize_array

if TYPE_CHECKING:  # torch where batches are augmented: TrainConfig builds an Augment without it
    import torch

GEOMETRY = ("rotation", "shift", "zoom", "hflip")
PHOTOMETRIC = ("gamma", "window", "blur", "sharpen", "noise")
ACQUISITION = (*PHOTOMETRIC, "crop", "aspect", "border")


@dataclass(frozen=True)
class Augment:
    """Random augmentation parameters (all zero / off: identity)."""

    rotation: float = 0.0  # max degrees either way
    shift: float = 0.0  # max fraction of the side either way
    zoom: float = 0.0  # scale drawn from [1 - zoom, 1 + zoom]
    hflip: bool = False
    gamma: float = 1.0  # exposure: gamma drawn log-uniformly from [1/gamma, gamma] (1: off)
    window: float = 0.0  # black level up to `window`, white level down to 1 - `window` (0: off)
    blur: float = 0.0  # Gaussian blur sigma up to this many pixels, on half the images (0: off)
    sharpen: float = 0.0  # unsharp-mask sharpness factor up to 1 + sharpen, on the other half (0: off)
    noise: float = 0.0  # additive Gaussian noise sigma up to this, in [0, 1] grey units (0: off)
    crop: float = 0.0  # field of view: a random crop keeping at least this share of the area (0: off)
    aspect: float = 1.0  # ... with an aspect ratio in [1/aspect, aspect], resized back (1: off)
    border: float = 0.0  # collimation: dark borders up to this share of the side, on half the images

    def __post_init__(self) -> None:
        bad = []
        if self.rotation < 0 or not 0 <= self.shift < 1 or not 0 <= self.zoom < 1:
            bad.append(f"rotation >= 0, shift and zoom in [0, 1) (rotation={self.rotation}, shift={self.shift}, "
                       f"zoom={self.zoom})")
        if self.gamma < 1 or self.aspect < 1:
            bad.append(f"gamma >= 1 and aspect >= 1 (1: off) (gamma={self.gamma}, aspect={self.aspect})")
        if not 0 <= self.window < 0.5 or not 0 <= self.border < 0.5 or self.noise < 0:
            bad.append(f"window and border in [0, 0.5), noise >= 0 (window={self.window}, border={self.border}, "
                       f"noise={self.noise})")
        if self.blur < 0 or self.sharpen < 0 or not (self.crop == 0 or 0.1 <= self.crop < 1):
            bad.append(f"blur, sharpen >= 0, crop 0 (off) or in [0.1, 1) (blur={self.blur}, sharpen={self.sharpen}, "
                       f"crop={self.crop})")
        if bad:
            raise ValueError("augmentation: " + "; ".join(bad))

    @property
    def geometric(self) -> bool:
        return bool(self.rotation or self.shift or self.zoom or self.hflip)

    @property
    def acquisition(self) -> bool:
        return any(getattr(self, n) != f.default for f in fields(self) if (n := f.name) in ACQUISITION)

    @property
    def enabled(self) -> bool:
        return self.geometric or self.acquisition

    def families(self) -> tuple[Augment, Augment]:
        """(the photometric augmentations only, the field of view and geometry only): `aug_families:
        alternate` gives cached augmented copies one family at a time."""
        off = {f.name: f.default for f in fields(self)}
        return (replace(self, **{n: off[n] for n in off if n not in PHOTOMETRIC}),
                replace(self, **{n: off[n] for n in PHOTOMETRIC}))

    def raw_spec(self, spec: InputSpec) -> InputSpec:
        """The spec training ingest reads the train split with: un-equalised when the acquisition
        augmentations must run before the equaliser, else the model's own."""
        return spec.replace(equalize="none") if self.acquisition and spec.equalize != "none" else spec

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 equalize: str = "none") -> torch.Tensor:
        """`uint8[N, S, S]` -> augmented `uint8[N, S, S]` (a new tensor; identity when disabled), then
        equalised with `equalize` (the model's mode) when the batch was read un-equalised."""
        import torch  # start-up time (see above)

        if not self.enabled or len(images) == 0:  # a family of `families()` may be empty
            return equalize_batch(images, equalize)

        if images.ndim != 3:
            raise ValueError(f"expected uint8[N, H, W], got shape {tuple(images.shape)}")
        u = torch.rand((len(images), 16), generator=generator)  # every random draw of a batch at once
        out = torch.empty_like(images)
        for i in range(len(images)):
            img = images[i].unsqueeze(0)
            if self.acquisition:
                img = self._acquisition(img, u[i], generator)
            if self.geometric:
                img = self._geometry(img, u[i])
            out[i] = img[0]
        return equalize_batch(out, equalize)

    def _geometry(self, img: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        _, h, w = img.shape
        r = u[:5] * 2 - 1  # uniform in [-1, 1)
        if self.hflip and r[4] > 0:
            img = F.horizontal_flip(img)
        return F.affine(img, angle=float(r[0] * self.rotation),
                        translate=[round(float(r[1] * self.shift * w)), round(float(r[2] * self.shift * h))],
                        scale=float(1 + r[3] * self.zoom), shear=[0.0, 0.0],
                        interpolation=F.InterpolationMode.BILINEAR, fill=0)

    def _acquisition(self, img: torch.Tensor, u: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Field of view, then exposure and window, blur or sharpening, noise, borders (u: 16 draws in [0, 1))."""
        import torch
        from torchvision.transforms.v2 import functional as F

        _, h, w = img.shape
        if self.crop:
            area = self.crop + (1 - self.crop) * float(u[5])
            ratio = math.exp((2 * float(u[6]) - 1) * math.log(self.aspect))
            ch, cw = min(h, round(h * math.sqrt(area / ratio))), min(w, round(w * math.sqrt(area * ratio)))
            top, left = round((h - ch) * float(u[7])), round((w - cw) * float(u[8]))
            img = F.resized_crop(img, top, left, ch, cw, [h, w], interpolation=F.InterpolationMode.BILINEAR,
                                 antialias=True)
        x = img.float() / 255.0
        if self.gamma > 1:
            x = x.clamp(min=1e-6) ** math.exp((2 * float(u[9]) - 1) * math.log(self.gamma))
        if self.window:
            lo, hi = self.window * float(u[10]), 1 - self.window * float(u[11])
            x = lo + (hi - lo) * x
        if self.blur and float(u[12]) < 0.5:
            sigma = max(0.1, self.blur * float(u[13]))
            x = F.gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
        elif self.sharpen and float(u[12]) >= 0.5:
            x = F.adjust_sharpness(x, 1 + self.sharpen * float(u[13]))
        if self.noise:
            x = x + torch.randn(x.shape, generator=generator) * (self.noise * float(u[14]))
        if self.border and float(u[15]) < 0.5:
            x = _borders(x, self.border, float(u[15]) * 2, generator)
        return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def equalize_batch(images: torch.Tensor, equalize: str) -> torch.Tensor:
    """`uint8[N, S, S]` equalised image by image with the shared `equalize_array` (`none`, or an
    empty batch: the same tensor)."""
    import torch

    if equalize == "none" or len(images) == 0:
        return images
    return torch.stack([torch.from_numpy(equalize_array(x.numpy(), equalize)) for x in images])


def _borders(x: torch.Tensor, most: float, draw: float, generator: torch.Generator | None) -> torch.Tensor:
    """Dark bands on one to four sides, each up to `most` of the side (collimator blades)."""
    import torch

    _, h, w = x.shape
    sides = torch.rand(4, generator=generator)
    widths = (torch.rand(4, generator=generator) * most * max(draw, 0.3)).tolist()
    x = x.clone()
    if sides[0] < 0.5:
        x[:, : round(widths[0] * h)] = 0
    if sides[1] < 0.5:
        x[:, h - round(widths[1] * h):] = 0
    if sides[2] < 0.5:
        x[:, :, : round(widths[2] * w)] = 0
    if sides[3] < 0.5:
        x[:, :, w - round(widths[3] * w):] = 0
    return x
