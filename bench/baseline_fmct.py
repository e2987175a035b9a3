"""An FM-CT-style data path, written only as the baseline of benchmark 1 (issue 4).

What FM-CT's public code does, per SPEC and RAY_ZARR_NOTES (its code is not in this repository;
this follows their description with MONAI's own transforms):

1. Once per scan, cached (MONAI PersistentDataset): the HU volume windowed into three channels
   (brain (40, 80), subdural (80, 200), bone (600, 2800), each clipped and scaled to [0, 1]),
   resized to 3x96^3 and stored as float16.
2. Per training sample, in the DataLoader workers: the cached 3x96^3 volume padded to 224^3 (the
   paper's "pad or crop to 224^3"), then for each of the 2 global and 3 local views a MONAI
   RandSpatialCrop (112-224^3 / 64-112^3, each edge drawn independently), Resize to 96^3 (MONAI's
   default mode "area": adaptive average pooling, `F.interpolate(mode="area")`), and the
   paper's augmentations (Supplementary "Data augmentation details"): RandFlip on all three axes,
   RandShiftIntensity (offset 0.1), RandGaussianSmooth (sigma 0.5-1.0), RandAdjustContrast (gamma
   0.2-1.0). The paper gives no probabilities: 0.5 each, the same as `fmct_ray.data.augment`.

Because the 96^3 content sits in the middle of 224^3 of zeros, a uniformly placed global crop is
about 81% padding, the figure quoted in the issue (`padding_share` measures it).

The padded volume is built once per sample and shared by its five views, which is the cheaper of
the two readings of that pipeline; the baseline is not made slower than it needs to be.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianSmooth,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
    ScaleIntensityRange,
    SpatialPad,
)

WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
PAD = 224
OUT = 96


def build_cache(volume: np.ndarray) -> np.ndarray:
    """The PersistentDataset item FM-CT trains from: (3, 96, 96, 96) float16 windows in [0, 1]."""
    hu = volume[None].astype(np.float32)
    chans = [
        ScaleIntensityRange(a_min=lv - w / 2, a_max=lv + w / 2, b_min=0.0, b_max=1.0, clip=True)(hu)
        for lv, w in WINDOWS
    ]
    img = Resize((OUT,) * 3, mode="area")(torch.cat([torch.as_tensor(c) for c in chans]))
    return torch.as_tensor(img).numpy().astype(np.float16)


def view_transform(roi: int, max_roi: int, prob: float = 0.5) -> Compose:
    """Crop, resize and augment one view, as FM-CT's MONAI pipeline does."""
    sigma = (0.5, 1.0)
    return Compose(
        [
            RandSpatialCrop(roi_size=roi, max_roi_size=max_roi, random_size=True),
            Resize((OUT,) * 3, mode="area"),  # MONAI's default mode, spelled out
            RandFlip(prob=prob, spatial_axis=0),
            RandFlip(prob=prob, spatial_axis=1),
            RandFlip(prob=prob, spatial_axis=2),
            RandShiftIntensity(offsets=0.1, prob=prob),
            RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=prob),
            RandAdjustContrast(prob=prob, gamma=(0.2, 1.0)),
        ]
    )


class FMCTBaselineDINO:
    """Per-sample DINO views from a cached volume: `__call__(cache)` -> {"global": (2, 3, 96, 96, 96),
    "local": (3, 3, 96, 96, 96)} float32 tensors."""

    def __init__(self, seed: int = 0, n_global: int = 2, n_local: int = 3, prob: float = 0.5) -> None:
        self.n_global, self.n_local = n_global, n_local
        self.pad = SpatialPad((PAD,) * 3)
        self.global_view = view_transform(112, 224, prob).set_random_state(seed)
        self.local_view = view_transform(64, 112, prob).set_random_state(seed + 1)

    def __call__(self, cache: np.ndarray) -> dict[str, torch.Tensor]:
        img = self.pad(torch.as_tensor(cache))
        glob = [torch.as_tensor(self.global_view(img)) for _ in range(self.n_global)]
        loc = [torch.as_tensor(self.local_view(img)) for _ in range(self.n_local)]
        return {"global": torch.stack(glob), "local": torch.stack(loc)}


def padding_share(n: int = 200, seed: int = 0) -> float:
    """Mean share of zero padding in FM-CT's global crops (the 96^3 content padded to 224^3)."""
    crop = RandSpatialCrop(roi_size=112, max_roi_size=224, random_size=True)
    crop.set_random_state(seed)
    ones = SpatialPad((PAD,) * 3)(torch.ones(1, OUT, OUT, OUT))
    return float(np.mean([1.0 - float(torch.as_tensor(crop(ones)).mean()) for _ in range(n)]))
