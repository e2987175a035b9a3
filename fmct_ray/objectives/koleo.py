"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; used by
DINOv2 with weight 0.1).

`L = -1/n sum_i log(d_i)`, with `d_i` the Euclidean distance from the L2-normalised embedding
`x_i` to its nearest neighbour in the batch. It pushes features of a batch apart (a differential
entropy estimate). With a process group the neighbour search runs over the global batch (rows
all-gathered with gradient), so each rank's loss is the mean over its own rows and the rank mean
equals the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmct_ray.objectives._dist import all_gather_with_grad, rank


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko nearest-neighbour entropy regulariser.

    Args:
        eps: added to distances before the log (DINOv2: 1e-8).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x (n, D) local embeddings -> scalar loss (mean over the local rows)."""
        x = F.normalize(x.float(), dim=-1, eps=self.eps)
        everyone = all_gather_with_grad(x)
        if everyone.shape[0] < 2:
            return x.sum() * 0.0  # no neighbour to measure
        offset = rank() * x.shape[0] if everyone.shape[0] != x.shape[0] else 0
        with torch.no_grad():
            sim = x @ everyone.T
            own = torch.arange(x.shape[0], device=x.device)
            sim[own, own + offset] = -2.0  # never its own neighbour (cosine >= -1)
            nn_idx = sim.argmax(dim=1)
        dist = F.pairwise_distance(x, everyone[nn_idx], eps=self.eps)
        return -torch.log(dist + self.eps).mean()
