"""3D vision transformer backbone (FM-CT ViT-B/12 and the VoxelFM variant).

A ViT (Dosovitskiy et al. 2021) on cubic patches of a CT volume: Conv3d patch embedding, CLS token,
optional register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"), pre-norm
blocks, final LayerNorm. Position information is either an absolute 3D embedding (fixed sin-cos as
in FM-CT, or learned), interpolated when the input grid differs from the configured one, or 3D
rotary encoding on patch tokens (VoxelFM / DINOv3), which needs no interpolation.

Public API (other packages build on these; keep them stable):

- `forward_features(x, mask=None, drop_masked=False) -> {"cls": (B, D), "patch": (B, N, D)}`
- `get_attention_maps(x) -> list[(B, heads, T, T)]`, tokens ordered [CLS, registers, patches]
- attributes `embed_dim`, `patch_size`, `num_blocks`, `num_heads`, `num_registers`,
  `num_prefix_tokens`, `in_chans`, `config` (the `ViT3DConfig` it was built from).

The model knows nothing about devices, ranks or Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fmct_ray.models.layers import Block, PatchEmbed3D
from fmct_ray.models.pos_embed import (
    interpolate_pos_embed,
    normalized_coords,
    rope_periods,
    rope_sincos,
    sincos_3d,
)


@dataclass(frozen=True)
class ViT3DConfig:
    """Architecture of a `VisionTransformer3D` (YAML-loadable; presets in `registry.py`).

    Args:
        img_size: default cubic input side (voxels); sets the absolute position-embedding grid.
        patch_size: cubic patch edge (voxels); input sides must be multiples of it.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias on q, k, v projections.
        pos_embed: "sincos" (fixed), "learned", "rope" (3D rotary on patches) or "none".
        rope_base: RoPE period base (VoxelFM: 100).
        num_registers: register tokens (excluded from the "patch" output).
        layerscale_init: LayerScale init value (VoxelFM: 1e-5), None to disable.
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this rate.
    """

    img_size: int = 96
    patch_size: int = 12
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: Literal["sincos", "learned", "rope", "none"] = "sincos"
    rope_base: float = 100.0
    num_registers: int = 0
    layerscale_init: float | None = None
    drop_path_rate: float = 0.0


class VisionTransformer3D(nn.Module):
    """3D ViT backbone. See the module docstring for the API; build with `create_model(name)`."""

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        c = config
        if c.img_size % c.patch_size:
            raise ValueError(f"img_size {c.img_size} is not a multiple of patch_size {c.patch_size}")
        self.config = c
        self.embed_dim, self.patch_size, self.in_chans = c.embed_dim, c.patch_size, c.in_chans
        self.num_blocks, self.num_heads, self.num_registers = c.depth, c.num_heads, c.num_registers
        self.num_prefix_tokens = 1 + c.num_registers
        n = c.img_size // c.patch_size
        self.grid_size = (n, n, n)
        self.patch_embed = PatchEmbed3D(c.in_chans, c.embed_dim, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        regs = nn.Parameter(torch.zeros(1, c.num_registers, c.embed_dim)) if c.num_registers else None
        self.register_tokens = regs
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = self._build_pos_embed()
        if c.pos_embed == "rope":
            self.register_buffer("rope_periods", rope_periods(c.embed_dim // c.num_heads, c.rope_base))
        dpr = [c.drop_path_rate * i / max(1, c.depth - 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, dpr[i], c.layerscale_init)
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self._init_weights()

    def _build_pos_embed(self) -> nn.Parameter | None:
        """(1, 1 + N, D) absolute embedding (row 0 for CLS); frozen for sin-cos, as in FM-CT / MAE."""
        kind = self.config.pos_embed
        if kind in ("rope", "none"):
            return None
        table = sincos_3d(self.embed_dim, self.grid_size, cls_token=True).unsqueeze(0)
        if kind == "learned":
            return nn.Parameter(torch.nn.init.trunc_normal_(torch.zeros_like(table), std=0.02))
        return nn.Parameter(table, requires_grad=False)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: patch embedding as a linear layer
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _abs_pos(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor] | None:
        """(cls_pos (1, 1, D), patch_pos (1, N, D)) for this grid, interpolated if needed."""
        if self.pos_embed is None:
            return None
        patch = interpolate_pos_embed(self.pos_embed[:, 1:], self.grid_size, grid)
        return self.pos_embed[:, :1], patch

    def _rope(self, grid: tuple[int, int, int], keep: Tensor | None, device: torch.device):
        """(sin, cos) of shape (1 or B, 1, N, head_dim); `keep` (B, N) selects visible patches."""
        if self.config.pos_embed != "rope":
            return None
        coords = normalized_coords(grid, device)
        if keep is not None:
            coords = coords.expand(keep.shape[0], -1, -1)[keep].reshape(keep.shape[0], -1, 3)
        sin, cos = rope_sincos(coords, self.rope_periods)
        return sin.unsqueeze(-3), cos.unsqueeze(-3)

    def prepare_tokens(self, x: Tensor, mask: Tensor | None = None, drop_masked: bool = False):
        """Embed patches, apply the mask, add positions, prepend CLS and registers.

        Returns:
            (tokens (B, 1 + R + N', D), rope or None), N' = N or the visible count.
        """
        grid = self.patch_embed.grid(x.shape)
        tokens = self.patch_embed(x)
        b, n, _ = tokens.shape
        if mask is not None and mask.shape != (b, n):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, patches) {(b, n)}")
        if mask is not None and not drop_masked:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        cls = self.cls_token.expand(b, -1, -1)
        pos = self._abs_pos(grid)
        if pos is not None:
            cls, tokens = cls + pos[0], tokens + pos[1].to(tokens.dtype)
        keep = None
        if mask is not None and drop_masked:
            keep = ~mask
            counts = keep.sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError("drop_masked needs the same number of masked patches in every sample")
            tokens = tokens[keep].reshape(b, -1, self.embed_dim)
        prefix = [cls] if self.register_tokens is None else [cls, self.register_tokens.expand(b, -1, -1)]
        return torch.cat([*prefix, tokens], dim=1), self._rope(grid, keep, x.device)

    def forward_features(
        self, x: Tensor, mask: Tensor | None = None, drop_masked: bool = False
    ) -> dict[str, Tensor]:
        """Encode a batch of volumes.

        Args:
            x: (B, C, D, H, W) float; sides multiples of `patch_size`.
            mask: optional boolean (B, N) patch mask, True = masked, N = number of patches in
                row-major (d, h, w) order. By default masked patches are replaced by the learned
                mask token (iBOT student). With `drop_masked=True` they are removed before the
                blocks (MAE encoder); every sample must then mask the same number of patches.
            drop_masked: see `mask`.

        Returns:
            {"cls": (B, D), "patch": (B, N', D)} after the final norm; N' = N, or the number of
            visible patches (in ascending patch index) when `drop_masked`. Registers are excluded.
        """
        tokens, rope = self.prepare_tokens(x, mask, drop_masked)
        for blk in self.blocks:
            tokens = blk(tokens, rope)
        tokens = self.norm(tokens)
        return {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :]}

    def forward(self, x: Tensor) -> Tensor:
        """CLS embedding (B, D): the global representation used by probes and fine-tuning."""
        return self.forward_features(x)["cls"]

    @torch.no_grad()
    def get_attention_maps(self, x: Tensor) -> list[Tensor]:
        """Softmax attention weights of every block for interpretation (SPEC 5, attention distance).

        A separate, explicit path: training uses SDPA and never materialises these weights.

        Returns:
            `num_blocks` tensors (B, heads, T, T), T = 1 + num_registers + N, token order
            [CLS, registers, patches].
        """
        tokens, rope = self.prepare_tokens(x)
        maps = []
        for blk in self.blocks:
            tokens, attn = blk(tokens, rope, return_attention=True)
            maps.append(attn)
        return maps


def with_overrides(config: ViT3DConfig, **overrides) -> ViT3DConfig:
    """A copy of `config` with fields replaced (unknown names raise TypeError)."""
    return dataclasses.replace(config, **overrides)
