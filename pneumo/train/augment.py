"""On-the-fly training augmentation of `uint8[N, S, S]` grayscale batches (training only).

Random rotation, shift, zoom and optional horizontal flip, as R2/R4/R5 used
(Keras `ImageDataGenerator(rotation_range, width/height_shift_range, zoom_range, horizontal_flip)`),
applied as one affine warp per image with `torchvision.transforms.v2.functional.affine`.
It runs in the Ray Train worker after the shared preprocessing (`pneumo.io.preprocess.load_image`)
and before `pneumo.io.preprocess.to_tensor`, so evaluation, scoring and serving never see it.

    aug = Augment(rotation=10, shift=0.1, zoom=0.1, hflip=False)
    batch = aug(batch_uint8, generator)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch where batches are augmented: TrainConfig builds an Augment without it
    import torch


@dataclass(frozen=True)
class Augment:
    """Random affine augmentation parameters (all zero: identity)."""

    rotation: float = 0.0  # max degrees either way
    shift: float = 0.0  # max fraction of the side either way
    zoom: float = 0.0  # scale drawn from [1 - zoom, 1 + zoom]
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.rotation < 0 or not 0 <= self.shift < 1 or not 0 <= self.zoom < 1:
            raise ValueError(
                f"augmentation: rotation >= 0, shift in [0, 1), zoom in [0, 1); got "
                f"rotation={self.rotation}, shift={self.shift}, zoom={self.zoom}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.rotation or self.shift or self.zoom or self.hflip)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`uint8[N, S, S]` -> augmented `uint8[N, S, S]` (a new tensor; identity when disabled)."""
        if not self.enabled or len(images) == 0:
            return images
        import torch  # start-up time (see above)
        from torchvision.transforms.v2 import functional as F

        if images.ndim != 3:
            raise ValueError(f"expected uint8[N, H, W], got shape {tuple(images.shape)}")
        n, h, w = images.shape
        u = torch.rand((n, 5), generator=generator) * 2 - 1  # uniform in [-1, 1)
        out = torch.empty_like(images)
        for i in range(n):
            img = images[i].unsqueeze(0)
            if self.hflip and u[i, 4] > 0:
                img = F.horizontal_flip(img)
            out[i] = F.affine(
                img,
                angle=float(u[i, 0] * self.rotation),
                translate=[round(float(u[i, 1] * self.shift * w)), round(float(u[i, 2] * self.shift * h))],
                scale=float(1 + u[i, 3] * self.zoom),
                shear=[0.0, 0.0],
                interpolation=F.InterpolationMode.BILINEAR,
                fill=0,
            )[0]
        return out
