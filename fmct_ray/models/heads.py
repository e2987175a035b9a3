"""Heads on top of a backbone: DINO projection head, linear probe, attentive probe.

- `DINOHead` (Caron et al. 2021, DINO; also the iBOT/DINOv2 patch head): MLP in-2048-2048-256,
  L2 normalisation, then a weight-normalised linear layer to K prototypes (65,536). Weight
  normalisation is written out (`weight_g * weight_v / ||weight_v||`) rather than through
  `torch.nn.utils` so that deepcopy (teacher), DDP and state dicts see two plain parameters; with
  `norm_last_layer=True` the norm `weight_g` is frozen at 1 (DINO's stabilising default).
- `LinearProbe`: non-affine BatchNorm1d then Linear on the CLS token (FM-CT linear probing, after
  MAE's linear-probe recipe).
- `AttentiveProbe`: one learned query cross-attending over all tokens, then LayerNorm + Linear
  (V-JEPA / VoxelFM-style attentive pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation (Salimans & Kingma 2016), DINO's last layer."""

    def __init__(self, in_dim: int, out_dim: int, freeze_norm: bool = True) -> None:
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.trunc_normal_(v, std=0.02)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_norm)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, w.to(x.dtype))


class DINOHead(nn.Module):
    """Projection head of DINO / iBOT: MLP -> L2 norm -> weight-normalised prototypes.

    Args:
        in_dim: backbone width.
        out_dim: number of prototypes K (65,536 in FM-CT and VoxelFM).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: width before the prototype layer (256).
        nlayers: MLP linear layers (3).
        norm_last_layer: freeze the prototype norms at 1.
        use_bn: BatchNorm after each hidden linear layer (DINO's `use_bn`). It keeps the head's
            outputs spread across the batch when the backbone's features barely differ between
            samples (small models on similar scans), where DINO otherwise collapses to uniform.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1])] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_dim) -> (..., out_dim) prototype logits (before temperature)."""
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _tokens(features: Tensor | dict[str, Tensor]) -> Tensor:
    if isinstance(features, dict):
        return torch.cat([features["cls"].unsqueeze(1), features["patch"]], dim=1)
    return features


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False) + Linear on the CLS embedding.

    Args:
        in_dim: backbone width.
        num_classes: logits (1 for a binary task with BCE, 2 for cross-entropy).
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor | dict[str, Tensor]) -> Tensor:
        """CLS (B, in_dim), or the backbone's `forward_features` dict -> logits (B, num_classes)."""
        cls = features["cls"] if isinstance(features, dict) else features
        return self.linear(self.norm(cls))


class AttentiveProbe(nn.Module):
    """A learned query attending over all tokens (attention pooling), then LayerNorm + Linear.

    Args:
        in_dim: backbone width.
        num_classes: logits.
        num_heads: heads of the pooling attention (in_dim must divide evenly).
    """

    def __init__(self, in_dim: int, num_classes: int, num_heads: int = 8) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, in_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, features: Tensor | dict[str, Tensor], return_weights: bool = False):
        """Tokens (B, T, in_dim) or a `forward_features` dict (CLS + patches) -> (B, num_classes).

        With `return_weights`, also the (B, T) pooling weights (averaged over heads).
        """
        tokens = _tokens(features)
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, weights = self.attn(q, tokens, tokens, need_weights=return_weights)
        logits = self.linear(self.norm(pooled.squeeze(1)))
        return (logits, weights.squeeze(1)) if return_weights else logits
