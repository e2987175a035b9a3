"""Batched view augmentation on whichever device the batch is on: int16 HU crops in, model input out.

The device half of the pretraining data path (issue 4): CPU workers ship int16 crops
(`fmct_ray.data.crops`); the training loop calls `GPUAugment(cfg)(batch, generator)` on the
(B, D, H, W) int16 batch after moving it to its device. Everything here is a tensor op over the
whole batch (per-sample parameters as tensors), with no `.cuda()` and no host synchronisation, so
the same code runs in CPU tests and on a GPU.

Order: flips (and axis permutations) on int16, then an optional random HU window (VoxelFM), then
the intensity mapping (FM-CT's three HU windows or VoxelFM's clipped z-score), then intensity
shift, Gaussian smoothing and gamma on the mapped values, as FM-CT's MONAI pipeline applies them to
windowed volumes.

Parameters: FM-CT (Zhu et al. 2026, Supplementary "Data augmentation details"): flips on all three
axes, intensity shift offset 0.1, Gaussian smoothing sigma 0.5-1.0, gamma 0.2-1.0; the paper gives
no probabilities, so each is applied with probability 0.5 here (configurable). VoxelFM
(`dinov2/data/transforms.py` of its public code): flips p=0.5 per axis, a random axis permutation
(its "random permutation of slice order"), and `Window(p=0.5)`: from the HU histogram of the view
(512 bins over [-1000, 1900]) take the 1st, 25th, 50th, 75th and 99th percentiles, draw a level
~ N(median, 0.2 IQR) and a width ~ U(0.5 IQR, 2 IQR) (at least 10 HU; the 1-99 range stands in
for an IQR under 1 HU) and clip the HU values to that window before the z-score.

Random numbers come from a CPU `torch.Generator` (or the global one when None), so a seed gives
the same augmentation parameters on CPU and GPU; only the small per-sample parameter tensors move
to the batch's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

FMCT_WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))  # (level, width): brain, subdural, bone


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply, with what parameters and probabilities.

    Args:
        intensity: "windows" -> len(windows) channels in [0, 1]; "zscore" -> 1 channel.
        windows: (level, width) HU windows, each clipped to [level - width/2, level + width/2] and
            scaled to [0, 1].
        clip_hu: HU range clipped before the z-score.
        zscore_mean: mean HU subtracted for "zscore".
        zscore_std: HU standard deviation divided out for "zscore".
        flip_prob: probability of a flip, independently per sample and axis.
        permute_prob: probability of a random permutation of the three spatial axes (cubic views).
        random_window_prob: probability of VoxelFM's random HU window (see the module docstring).
        random_window_level_std: level std as a fraction of the IQR.
        random_window_width: (min, max) window width as multiples of the IQR.
        random_window_percentiles: (low, high) percentiles that replace the IQR when it is < 1 HU.
        random_window_bins: histogram bins over `clip_hu` for the percentiles.
        shift_prob: probability of an intensity shift.
        shift_offset: shift drawn from U(-offset, offset), added to every channel (MONAI
            RandShiftIntensity, channel_wise=False).
        smooth_prob: probability of Gaussian smoothing.
        smooth_sigma: (min, max) sigma in voxels, drawn per sample and axis (MONAI RandGaussianSmooth).
        gamma_prob: probability of a gamma adjustment.
        gamma: (min, max) gamma; x -> ((x - min) / range) ** gamma * range + min over the sample
            (MONAI RandAdjustContrast).
    """

    intensity: Literal["windows", "zscore"] = "windows"
    windows: tuple[tuple[float, float], ...] = FMCT_WINDOWS
    clip_hu: tuple[float, float] = (-1000.0, 1900.0)
    zscore_mean: float = -573.8
    zscore_std: float = 461.3
    flip_prob: float = 0.5
    permute_prob: float = 0.0
    random_window_prob: float = 0.0
    random_window_level_std: float = 0.2
    random_window_width: tuple[float, float] = (0.5, 2.0)
    random_window_percentiles: tuple[float, float] = (1.0, 99.0)
    random_window_bins: int = 512
    shift_prob: float = 0.5
    shift_offset: float = 0.1
    smooth_prob: float = 0.5
    smooth_sigma: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.5
    gamma: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self) -> None:
        probs = ("flip_prob", "permute_prob", "random_window_prob", "shift_prob", "smooth_prob", "gamma_prob")
        for name in probs:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.intensity == "windows" and not self.windows:
            raise ValueError("intensity='windows' needs at least one window")
        if any(w <= 0 for _, w in self.windows) or self.zscore_std <= 0:
            raise ValueError("window widths and zscore_std must be positive")
        for name in ("smooth_sigma", "gamma", "random_window_width", "clip_hu"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (min, max) with min <= max, got {(lo, hi)}")
        if self.smooth_sigma[0] <= 0 or self.gamma[0] <= 0:
            raise ValueError("smooth_sigma and gamma must be positive")

    @property
    def channels(self) -> int:
        return len(self.windows) if self.intensity == "windows" else 1


def fmct_augment(**overrides) -> AugmentConfig:
    """FM-CT DINO views: flips, 3 HU windows, shift 0.1, smoothing sigma 0.5-1.0, gamma 0.2-1.0."""
    return AugmentConfig(**overrides)


def voxelfm_augment(**overrides) -> AugmentConfig:
    """VoxelFM global views: flips, axis permutation, random window p=0.5, clipped z-score, nothing
    else (its local views get only the permutation: `voxelfm_augment(flip_prob=0,
    random_window_prob=0)`)."""
    base = dict(intensity="zscore", permute_prob=1.0, random_window_prob=0.5)
    base.update(shift_prob=0.0, smooth_prob=0.0, gamma_prob=0.0)
    return AugmentConfig(**{**base, **overrides})


AUGMENT_PRESETS = {"fmct": fmct_augment, "voxelfm": voxelfm_augment}


def _draw(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    """U[0, 1) on the CPU (generator state is device independent)."""
    return torch.rand(*shape, generator=generator)


def _uniform(generator: torch.Generator | None, n: int, lo: float, hi: float, *extra: int) -> torch.Tensor:
    return lo + (hi - lo) * _draw(generator, n, *extra)


def _chosen(generator: torch.Generator | None, n: int, prob: float) -> torch.Tensor:
    """Indices (CPU, long) of the samples an augmentation with probability `prob` applies to."""
    return torch.nonzero(_draw(generator, n) < prob).flatten()


def random_flip(x: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each sample of (B, D, H, W) along each spatial axis with probability `prob`."""
    flips = _draw(generator, x.shape[0], 3) < prob
    for axis in range(3):
        idx = torch.nonzero(flips[:, axis]).flatten()
        if len(idx):
            idx = idx.to(x.device)
            x = x.index_copy(0, idx, x.index_select(0, idx).flip(axis + 1))
    return x


def random_permute(x: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """With probability `prob` per sample, permute the three spatial axes of (B, S, S, S) at random."""
    n = x.shape[0]
    apply = _draw(generator, n) < prob
    perms = torch.argsort(_draw(generator, n, 3), dim=1)
    if not bool(apply.any()):
        return x
    if not x.shape[1] == x.shape[2] == x.shape[3]:
        raise ValueError(f"axis permutation needs cubic views, got {tuple(x.shape[1:])}")
    out = x.clone()
    for i in torch.nonzero(apply).flatten().tolist():
        out[i] = x[i].permute(*perms[i].tolist())
    return out


def hu_windows(x: torch.Tensor, windows: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """(B, D, H, W) HU -> (B, len(windows), D, H, W) in [0, 1]: each (level, width) window clipped and
    scaled."""
    x = x.float()
    chans = [((x - (level - width / 2)) / width).clamp_(0.0, 1.0) for level, width in windows]
    return torch.stack(chans, dim=1)


def hu_zscore(x: torch.Tensor, clip: tuple[float, float], mean: float, std: float) -> torch.Tensor:
    """(B, D, H, W) HU -> (B, 1, D, H, W): clip to `clip`, subtract `mean`, divide by `std`."""
    return ((x.float().clamp(*clip) - mean) / std).unsqueeze(1)


def _percentiles(x: torch.Tensor, qs: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Per-sample percentiles (B, len(qs)) from a histogram of the values in [lo, hi], as VoxelFM's
    `Window` computes them: the left edge of the first bin whose cumulative count reaches q * total.
    Voxels outside [lo, hi] (air at -1024) are ignored, as `torch.histogram` ignores them. One
    `histc` per sample keeps memory at one histogram, not an index per voxel."""
    hist = torch.stack([torch.histc(sample, bins=bins, min=lo, max=hi) for sample in x])
    cdf = hist.cumsum(dim=1)
    targets = qs.to(x.device)[None, :] * cdf[:, -1:]
    q_idx = torch.searchsorted(cdf, targets.contiguous()).clamp_(0, bins - 1)
    return lo + q_idx.float() * ((hi - lo) / bins)


def random_window(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """VoxelFM's random HU window: clip chosen samples of float HU (B, D, H, W) to a window drawn
    around their median with a width set by their interquartile range."""
    idx = _chosen(generator, x.shape[0], cfg.random_window_prob)
    normal = torch.randn(x.shape[0], generator=generator)[idx]
    unit = _draw(generator, x.shape[0])[idx]
    if not len(idx):
        return x
    dev_idx = idx.to(x.device)
    sel = x.index_select(0, dev_idx)
    p_lo, p_hi = cfg.random_window_percentiles
    qs = torch.tensor([p_lo / 100, 0.25, 0.5, 0.75, p_hi / 100])
    p1, q1, med, q3, p99 = _percentiles(sel, qs, *cfg.clip_hu, cfg.random_window_bins).unbind(1)
    iqr = q3 - q1
    iqr = torch.where(iqr < 1.0, (p99 - p1).clamp(min=1.0), iqr)
    level = med + normal.to(x.device) * cfg.random_window_level_std * iqr
    w_lo, w_hi = cfg.random_window_width
    width = (iqr * (w_lo + (w_hi - w_lo) * unit.to(x.device))).clamp(min=10.0)
    view = (-1,) + (1,) * (x.dim() - 1)
    sel = torch.maximum(torch.minimum(sel, (level + width / 2).view(view)), (level - width / 2).view(view))
    return x.index_copy(0, dev_idx, sel)


def random_shift(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Add U(-offset, offset) to every voxel of each chosen sample of (B, C, D, H, W)."""
    apply = (_draw(generator, x.shape[0]) < cfg.shift_prob).float()
    offset = _uniform(generator, x.shape[0], -cfg.shift_offset, cfg.shift_offset) * apply
    return x + offset.to(x.device).view(-1, 1, 1, 1, 1)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(N,) sigmas -> (N, 2 * radius + 1) sampled Gaussian kernels, each summing to 1."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_smooth(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W) with per-sample, per-axis sigma (B, 3), in voxels.

    Kernels are truncated at 4 sigma (as MONAI's); borders are replicated so that a constant stays
    constant (zero padding would darken the edges of every view).
    """
    b, c = x.shape[:2]
    radius = max(1, math.ceil(4.0 * float(sigma.max())))
    sigma = sigma.to(x.device, torch.float32)
    y = x.reshape(1, b * c, *x.shape[2:])
    for axis in range(3):
        k = gaussian_kernels(sigma[:, axis], radius).repeat_interleave(c, dim=0)  # (B*C, K)
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape), groups=b * c)
    return y.view_as(x)


def random_smooth(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian-smooth each chosen sample with sigma ~ U(smooth_sigma) drawn per axis."""
    idx = _chosen(generator, x.shape[0], cfg.smooth_prob)
    sigma = _uniform(generator, x.shape[0], *cfg.smooth_sigma, 3)[idx]
    if not len(idx):
        return x
    dev_idx = idx.to(x.device)
    return x.index_copy(0, dev_idx, gaussian_smooth(x.index_select(0, dev_idx), sigma))


def adjust_gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI AdjustContrast per sample of (B, ...): ((x - min) / range) ** gamma * range + min."""
    flat = x.reshape(x.shape[0], -1)
    view = (-1,) + (1,) * (x.dim() - 1)
    lo = flat.amin(dim=1).view(view)
    rng = flat.amax(dim=1).view(view) - lo
    return ((x - lo) / (rng + 1e-7)).pow(gamma.to(x.device).view(view)) * rng + lo


def random_gamma(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma-adjust each chosen sample with gamma ~ U(cfg.gamma)."""
    idx = _chosen(generator, x.shape[0], cfg.gamma_prob)
    gamma = _uniform(generator, x.shape[0], *cfg.gamma)[idx]
    if not len(idx):
        return x
    dev_idx = idx.to(x.device)
    return x.index_copy(0, dev_idx, adjust_gamma(x.index_select(0, dev_idx), gamma))


class GPUAugment:
    """`GPUAugment(cfg)(batch, generator)`: int16 HU views (B, D, H, W) on any device ->
    float32 (B, C, D, H, W) on the same device, C = cfg.channels.

    Every random draw comes from `generator` (a CPU torch.Generator; None uses the global one) in a
    fixed order, so the same seed gives the same output, on CPU and on GPU alike.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if batch.dim() != 4:
            raise ValueError(f"expected (B, D, H, W) views, got shape {tuple(batch.shape)}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("pass a CPU torch.Generator; parameters are drawn on the CPU")
        cfg = self.cfg
        x = random_flip(batch, cfg.flip_prob, generator)
        if cfg.permute_prob > 0:
            x = random_permute(x, cfg.permute_prob, generator)
        x = x.float()
        if cfg.random_window_prob > 0:
            x = random_window(x, cfg, generator)
        if cfg.intensity == "windows":
            x = hu_windows(x, cfg.windows)
        else:
            x = hu_zscore(x, cfg.clip_hu, cfg.zscore_mean, cfg.zscore_std)
        if cfg.shift_prob > 0:
            x = random_shift(x, cfg, generator)
        if cfg.smooth_prob > 0:
            x = random_smooth(x, cfg, generator)
        if cfg.gamma_prob > 0:
            x = random_gamma(x, cfg, generator)
        return x
