"""Attention distance (SPEC section 5): how far, in millimetres, each patch looks.

For head h of layer l, D_i = sum_j A_ij d(i, j): the attention-weighted mean distance between
patch i and the patches j it attends to (Dosovitskiy et al. 2021, Fig. 7; FM-CT interpretation).
The attention rows are restricted to patch keys and renormalised (CLS and register keys have no
position). D is averaged over heads and layers and shown as a map over the volume: small values
are local features, large values global context.
"""

from __future__ import annotations

import numpy as np
import torch

from fmct_ray.models.vit3d import VisionTransformer3D


def patch_distances(grid: tuple[int, int, int], spacing_mm: float) -> torch.Tensor:
    """(N, N) Euclidean distances between patch centres, in mm (`spacing_mm` = patch edge in mm)."""
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij"), -1
    )
    coords = coords.reshape(-1, 3) * spacing_mm
    return torch.cdist(coords, coords)


def attention_distance(model: VisionTransformer3D, x: torch.Tensor, voxel_mm: float = 1.0) -> torch.Tensor:
    """Per-patch attention distance averaged over heads and layers.

    Args:
        model: the backbone.
        x: (B, C, D, H, W) model input.
        voxel_mm: edge of one input voxel in mm (the 192 mm centre crop at 96^3: 2 mm).

    Returns:
        (B, layers, gd, gh, gw): per layer (averaged over heads); average over dim 1 for the map.
    """
    grid = model.patch_embed.grid(x.shape)
    dist = patch_distances(grid, model.patch_size * voxel_mm).to(x.device)
    prefix = model.num_prefix_tokens
    per_layer = []
    for attn in model.get_attention_maps(x):  # (B, heads, T, T)
        a = attn[:, :, prefix:, prefix:].float()
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        per_layer.append((a * dist).sum(-1).mean(1))  # (B, N)
    return torch.stack(per_layer, 1).reshape(x.shape[0], len(per_layer), *grid)


def distance_map(model: VisionTransformer3D, x: torch.Tensor, voxel_mm: float = 1.0) -> np.ndarray:
    """(gd, gh, gw) map of the first sample, averaged over heads and layers."""
    model.eval()
    return attention_distance(model, x[:1], voxel_mm)[0].mean(0).cpu().numpy()
