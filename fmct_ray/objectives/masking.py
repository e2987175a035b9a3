"""Patch masks: 3D block masking for iBOT and uniform random masking for MAE.

- Block masking (BEiT, Bao et al. 2022, Alg. 1; iBOT / DINOv2 `MaskingGenerator`) in 3D: boxes of
  random volume and log-uniform aspect ratios are added until the target count is approached;
  the remainder is filled (or trimmed) with random single patches so the count is exact (DINOv2's
  `complete_mask_randomly`).
- iBOT batch masks (DINOv2 `collate_data_and_cast`): a fraction of the global-crop samples
  (0.5) is masked; their ratios are spread evenly over the range (0.1, 0.5) by stratified draws.
- MAE random masking (He et al. 2022): exactly round(ratio * N) patches per sample, uniformly.

All functions take a `torch.Generator` so masks are reproducible; they return CPU bool tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rand(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def _randint(high: int, gen: torch.Generator | None) -> int:
    return int(torch.randint(high, (), generator=gen))


def _random_box(grid: tuple[int, int, int], volume: float, log_aspect: tuple[float, float], gen):
    """A box (sizes per axis) of about `volume` patches with two log-uniform aspect ratios."""
    r1 = math.exp(log_aspect[0] + _rand(gen) * (log_aspect[1] - log_aspect[0]))
    r2 = math.exp(log_aspect[0] + _rand(gen) * (log_aspect[1] - log_aspect[0]))
    side = volume ** (1 / 3)
    sizes = (side * r1, side / math.sqrt(r1) * r2, side / math.sqrt(r1) / r2)
    return tuple(max(1, min(int(round(s)), g)) for s, g in zip(sizes, grid, strict=True))


def block_mask_3d(
    grid: tuple[int, int, int],
    num_masked: int,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 10,
) -> Tensor:
    """Boolean (d*h*w,) mask with exactly `num_masked` True, made mostly of random 3D boxes.

    Args:
        grid: patch grid (d, h, w).
        num_masked: exact number of masked patches.
        generator: random generator.
        min_block: smallest box volume (patches) to attempt.
        aspect_range: range of each aspect ratio (sampled log-uniformly).
        max_tries: attempts per box that add no new patch before stopping.
    """
    n = grid[0] * grid[1] * grid[2]
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked {num_masked} not in [0, {n}]")
    mask = torch.zeros(grid, dtype=torch.bool)
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    tries = 0
    while int(mask.sum()) < num_masked and tries < max_tries:
        left = num_masked - int(mask.sum())
        volume = min_block + _rand(generator) * max(0, left - min_block)
        sd, sh, sw = _random_box(grid, volume, log_aspect, generator)
        z, y, x = (_randint(g - s + 1, generator) for g, s in zip(grid, (sd, sh, sw), strict=True))
        box = mask[z : z + sd, y : y + sh, x : x + sw]
        new = int((~box).sum())
        if 0 < new <= left:
            box.fill_(True)
            tries = 0
        else:
            tries += 1
    return _complete(mask.flatten(), num_masked, generator)


def _complete(mask: Tensor, num_masked: int, generator: torch.Generator | None) -> Tensor:
    """Add (or remove) random patches until exactly `num_masked` are True."""
    diff = num_masked - int(mask.sum())
    if diff:
        pool = (~mask if diff > 0 else mask).nonzero().squeeze(1)
        pick = pool[torch.randperm(pool.numel(), generator=generator)[: abs(diff)]]
        mask[pick] = diff > 0
    return mask


def ibot_masks(
    batch_size: int,
    grid: tuple[int, int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    masked_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Masks (batch_size, N) for the student's global crops (iBOT / DINOv2 collate).

    `int(batch_size * masked_fraction)` samples get a block mask; sample i of them masks exactly
    `int(N * r_i)` patches with r_i drawn uniformly in the i-th of equal sub-intervals of
    `ratio_range`; the other samples are unmasked. Rows are shuffled.
    """
    n = grid[0] * grid[1] * grid[2]
    n_masked_samples = int(batch_size * masked_fraction)
    edges = torch.linspace(ratio_range[0], ratio_range[1], n_masked_samples + 1).tolist()
    rows = []
    for i in range(n_masked_samples):
        ratio = edges[i] + _rand(generator) * (edges[i + 1] - edges[i])
        rows.append(block_mask_3d(grid, int(n * ratio), generator))
    rows += [torch.zeros(n, dtype=torch.bool)] * (batch_size - n_masked_samples)
    masks = torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.bool)
    return masks[torch.randperm(batch_size, generator=generator)]


def random_masks(
    batch_size: int, num_patches: int, ratio: float = 0.75, generator: torch.Generator | None = None
) -> Tensor:
    """MAE masks (batch_size, num_patches): exactly `round(ratio * num_patches)` True per row."""
    num_masked = int(round(ratio * num_patches))
    noise = torch.rand(batch_size, num_patches, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked
