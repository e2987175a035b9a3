"""DINO self-distillation loss on CLS prototypes (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", Sec. 3.1 and Algorithm 1).

The teacher's prototype logits are centred by an EMA centre `c` (momentum 0.9) and sharpened by a
low temperature; the student's logits use temperature 0.1; the loss is the cross-entropy
`-sum_k P_t(k) log P_s(k)` averaged over the batch and over every (teacher global view, student
view) pair with different views. The centre is a registered buffer (checkpointed with the task)
and its batch mean is all-reduced across ranks only when a process group exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmct_ray.objectives._dist import all_reduce_sum, world_size


class DINOLoss(nn.Module):
    """DINO cross-view loss with teacher centring.

    Args:
        out_dim: number of prototypes K.
        student_temp: student temperature (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - c) / teacher_temp), computed in float32."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_logits: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
        """Mean cross-entropy over pairs (teacher view i, student view j), i != j.

        Args:
            student_logits: one (B, K) tensor per student view, global views first, in the same
                order as the teacher's (view j == i is the same crop and is skipped).
            teacher_probs: one (B, K) tensor per teacher (global) view, from `teacher_probs`.
        """
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        total, n_terms = 0.0, 0
        for i, q in enumerate(teacher_probs):
            for j, lp in enumerate(log_p):
                if i == j:
                    continue
                total = total + torch.sum(-q * lp, dim=-1).mean()
                n_terms += 1
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """c <- m c + (1 - m) mean(teacher logits over the global batch), all-reduced across ranks."""
        batch_sum = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center = batch_sum / (teacher_logits.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
