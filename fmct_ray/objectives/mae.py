"""MAE reconstruction loss (He et al. 2022, Sec. 3: "MSE ... computed only on masked patches";
optional per-patch normalised targets, their best variant).
"""

from __future__ import annotations

from torch import Tensor


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False, eps: float = 1e-6) -> Tensor:
    """Mean squared error over the voxels of masked patches.

    Args:
        pred: (B, N, P) predicted patches.
        target: (B, N, P) true patches (`patchify` of the input).
        mask: (B, N) bool, True = masked; only these patches count.
        norm_pix: normalise each target patch to zero mean, unit variance first.
        eps: variance floor for `norm_pix`.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp(min=1.0)
