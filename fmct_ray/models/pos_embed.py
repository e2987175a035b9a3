"""Position encodings for 3D patch grids: fixed sin-cos (absolute) and rotary (relative).

- 3D sin-cos: the 2D construction of MAE (He et al. 2022, `get_2d_sincos_pos_embed`) extended to
  three axes, as in FM-CT (Zhu et al.): the channel dimension is split into three equal parts, one
  per axis (depth, height, width); each part holds `sin(p * w_k)` then `cos(p * w_k)` for the
  integer grid coordinate `p` and frequencies `w_k = 1 / 10000^(k / (dim/6))`.
- 3D rotary (RoPE, Su et al. 2021) as in DINOv3 / VoxelFM: patch-centre coordinates normalised
  to [-1, 1] per axis, periods `base^(k / n)` (base 100), one block of `head_dim/6` frequencies per
  axis, applied to queries and keys of patch tokens only (CLS and registers are not rotated).
  Because coordinates are normalised, any grid size is accepted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sin-cos embedding of 1D positions.

    Args:
        dim: output channels (even).
        positions: (M,) positions.

    Returns:
        (M, dim): `[sin(p * w_0..w_{dim/2-1}), cos(p * w_0..)]` with `w_k = 10000^(-2k/dim)`.
    """
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def grid_coords(grid: tuple[int, int, int], device: torch.device | None = None) -> Tensor:
    """Integer (d, h, w) coordinates of every patch of a grid in row-major order, shape (N, 3)."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def sincos_3d(dim: int, grid: tuple[int, int, int], cls_token: bool = False) -> Tensor:
    """3D sin-cos position embedding (FM-CT; MAE's 2D version on three axes).

    Args:
        dim: embedding width (even). With dim divisible by 6 each axis gets dim/3 channels;
            otherwise the first two axes get 2*floor(dim/6) and the last axis the rest.
        grid: patch grid (d, h, w).
        cls_token: prepend a zero row for the CLS token (MAE convention).

    Returns:
        (N, dim) or (1 + N, dim) float32, rows in row-major (d, h, w) order; channels
        `[0, dim/3)` encode depth, `[dim/3, 2dim/3)` height and the rest width.
    """
    if dim % 2:
        raise ValueError(f"3D sin-cos needs an even dim, got {dim}")
    part = 2 * (dim // 6)
    widths = (part, part, dim - 2 * part)
    coords = grid_coords(grid)
    emb = torch.cat([sincos_1d(w, coords[:, a]) for a, w in enumerate(widths)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


def interpolate_pos_embed(pos: Tensor, src: tuple[int, int, int], dst: tuple[int, int, int]) -> Tensor:
    """Resample patch position embeddings (1, N_src, D) from grid `src` to grid `dst` (trilinear)."""
    if tuple(src) == tuple(dst):
        return pos
    dim = pos.shape[-1]
    vol = pos.reshape(1, *src, dim).permute(0, 4, 1, 2, 3)
    vol = F.interpolate(vol.float(), size=tuple(dst), mode="trilinear", align_corners=False)
    return vol.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos.dtype)


def normalized_coords(grid: tuple[int, int, int], device: torch.device | None = None) -> Tensor:
    """Patch-centre coordinates in [-1, 1] per axis (DINOv3 RoPE convention), shape (N, 3)."""
    axes = [((torch.arange(n, device=device) + 0.5) / n) * 2 - 1 for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_periods(head_dim: int, base: float = 100.0) -> Tensor:
    """Periods `base^(k/n)`, k < n = head_dim/6: one set of n frequencies per spatial axis."""
    if head_dim % 6:
        raise ValueError(f"3D rotary encoding needs head_dim divisible by 6, got {head_dim}")
    n = head_dim // 6
    return base ** (torch.arange(n, dtype=torch.float32) / n)


def rope_sincos(coords: Tensor, periods: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation sin/cos for coordinates (..., N, 3) -> two tensors (..., N, head_dim).

    The angle of frequency k on axis a is `2 pi * coord_a / period_k`; the 3n angles are tiled
    twice so that channel i and channel i + head_dim/2 form one rotated pair (`rotate_half`).
    """
    angles = 2 * math.pi * coords.float().unsqueeze(-1) / periods.to(coords.device)
    angles = angles.flatten(-2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.sin(), angles.cos()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate queries or keys x (B, heads, N, head_dim) by angles broadcastable to x."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)
