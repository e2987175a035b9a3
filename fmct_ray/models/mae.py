"""Masked autoencoder for volumes (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The encoder is any `VisionTransformer3D`; it sees only the visible patches
(`forward_features(x, mask, drop_masked=True)`). A light decoder embeds the visible tokens,
fills masked positions with a shared learned mask token, adds a fixed 3D sin-cos position
embedding, runs its own blocks and predicts the voxels of every patch. The loss (in
`fmct_ray.objectives.mae`) is taken on masked patches only.

`patchify` / `unpatchify` are exact inverses; a patch is flattened in (pd, ph, pw, C) order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmct_ray.models.layers import Block
from fmct_ray.models.pos_embed import sincos_3d
from fmct_ray.models.vit3d import VisionTransformer3D


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, D, H, W) -> (B, N, p^3 * C), patches in row-major (d, h, w) order."""
    b, c, d, h, w = x.shape
    p = patch_size
    if d % p or h % p or w % p:
        raise ValueError(f"input sides {(d, h, w)} are not multiples of the patch size {p}")
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int, int], in_chans: int) -> Tensor:
    """Inverse of `patchify`: (B, N, p^3 * C) -> (B, C, gd*p, gh*p, gw*p)."""
    b = patches.shape[0]
    p = patch_size
    gd, gh, gw = grid
    x = patches.reshape(b, gd, gh, gw, p, p, p, in_chans)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, in_chans, gd * p, gh * p, gw * p)


class MAEDecoder(nn.Module):
    """MAE decoder: linear embed, mask tokens at masked positions, fixed sin-cos positions, blocks.

    Args:
        encoder_dim: encoder width.
        patch_voxels: values predicted per patch (p^3 * C).
        dim: decoder width (512 in MAE).
        depth: decoder blocks (8 in MAE).
        num_heads: decoder heads (16 in MAE).
    """

    def __init__(
        self, encoder_dim: int, patch_voxels: int, dim: int = 512, depth: int = 8, num_heads: int = 16
    ):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_voxels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, cls: Tensor, visible: Tensor, mask: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Predict every patch.

        Args:
            cls: (B, encoder_dim) encoder CLS.
            visible: (B, N_vis, encoder_dim) encoder tokens of visible patches, ascending index.
            mask: (B, N) bool, True = masked.
            grid: patch grid, N = prod(grid).

        Returns:
            (B, N, patch_voxels) predictions for all patches (the loss reads the masked ones).
        """
        b, n = mask.shape
        vis = self.embed(visible)
        full = self.mask_token.to(vis.dtype).expand(b, n, -1).clone()
        full[~mask] = vis.reshape(-1, self.dim)
        pos = sincos_3d(self.dim, grid, cls_token=True).to(vis.device, vis.dtype).unsqueeze(0)
        tokens = torch.cat([self.embed(cls).unsqueeze(1), full], dim=1) + pos
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.pred(self.norm(tokens)[:, 1:])


class MaskedAutoencoder3D(nn.Module):
    """Encoder on visible patches + `MAEDecoder`. `forward(x, mask) -> (B, N, p^3 C)` predictions.

    Args:
        encoder: the backbone (its `mask_token` is unused in MAE and left without gradient).
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder heads.
    """

    def __init__(
        self,
        encoder: VisionTransformer3D,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        patch_voxels = encoder.patch_size**3 * encoder.in_chans
        self.decoder = MAEDecoder(encoder.embed_dim, patch_voxels, decoder_dim, decoder_depth, decoder_heads)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        grid = self.encoder.patch_embed.grid(x.shape)
        feats = self.encoder.forward_features(x, mask, drop_masked=True)
        return self.decoder(feats["cls"], feats["patch"], mask, grid)
