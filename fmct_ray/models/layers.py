"""Transformer building blocks: 3D patch embedding, attention (SDPA + optional RoPE), MLP, block.

Pre-norm blocks as in ViT (Dosovitskiy et al. 2021), with the DINOv2 additions LayerScale
(Touvron et al. 2021, CaiT) and stochastic depth (drop-path, Huang et al. 2016). Attention goes
through `F.scaled_dot_product_attention` so GPUs use fused (flash / memory-efficient) kernels;
attention weights are only materialised on the explicit `return_attention=True` path, which
training never takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmct_ray.models.pos_embed import apply_rope


class PatchEmbed3D(nn.Module):
    """Non-overlapping p^3 patches -> tokens via a strided Conv3d.

    Args:
        in_chans: input channels (3 HU windows for FM-CT, 1 for VoxelFM).
        embed_dim: token width.
        patch_size: cubic patch edge in voxels.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Patch grid (d, h, w) for a (B, C, D, H, W) input shape; sides must be multiples of p."""
        sides = tuple(shape[-3:])
        if any(s % self.patch_size for s in sides):
            raise ValueError(f"input sides {sides} are not multiples of the patch size {self.patch_size}")
        return tuple(s // self.patch_size for s in sides)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, N, embed_dim), tokens in row-major (d, h, w) order."""
        self.grid(x.shape)
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the residual branch per sample with probability p, rescale by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class LayerScale(nn.Module):
    """Per-channel learned residual scale `gamma` initialised small (CaiT; DINOv2 uses 1e-5)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention through SDPA; RoPE applied to the last `N` (patch) tokens only.

    Args:
        dim: token width.
        num_heads: attention heads (dim must divide evenly).
        qkv_bias: bias on the q, k, v projections.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            sin, cos = rope
            n_prefix = t - sin.shape[-2]
            q = torch.cat([q[:, :, :n_prefix], apply_rope(q[:, :, n_prefix:], sin, cos)], dim=2)
            k = torch.cat([k[:, :, :n_prefix], apply_rope(k[:, :, n_prefix:], sin, cos)], dim=2)
        return q, k, v

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, dim) -> (B, T, dim); with `return_attention` also the (B, heads, T, T) weights.

        Args:
            x: tokens, prefix (CLS, registers) first, then patches.
            rope: (sin, cos) broadcastable to (B, heads, N_patch, head_dim), or None.
            return_attention: compute softmax(QK^T / sqrt(d)) explicitly (slow; interpretation only).
        """
        b, t, d = x.shape
        q, k, v = self._qkv(x, rope)
        if return_attention:
            attn = (q.float() @ k.float().transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
            out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, d)
            return self.proj(out), attn
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls(attn(norm(x))), then x + ls(mlp(norm(x))), with drop-path.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on q, k, v.
        drop_path: stochastic depth rate of this block.
        layerscale_init: LayerScale initial value, or None for no LayerScale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layerscale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = drop_path

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        attn_out = self.attn(self.norm1(x), rope, return_attention)
        attn_w = None
        if return_attention:
            attn_out, attn_w = attn_out
        x = x + drop_path(self.ls1(attn_out), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return (x, attn_w) if return_attention else x
