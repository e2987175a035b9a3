"""iBOT masked-patch self-distillation loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with
Online Tokenizer"; DINOv2 `iBOTPatchLoss.forward_masked`).

For every masked patch of a student global crop, the student's patch prototype distribution is
trained to match the teacher's (centred, sharpened) distribution for the same patch of the
unmasked crop. Token losses are weighted by 1 / (masked patches of their image), summed, and
divided by the number of global-crop samples, masked or not (DINOv2 `forward_masked`): a masked
image weighs 1 / (G B), so with half of them masked the loss is half the mean over masked images.
The patch centre is its own buffer; its update is the mean over all masked tokens of the global
batch (sum and count all-reduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fmct_ray.objectives._dist import all_reduce_sum
from fmct_ray.objectives.dino import DINOLoss


class IBOTPatchLoss(DINOLoss):
    """iBOT loss on masked patch tokens; centre and sharpening as in `DINOLoss` (its own centre).

    Args:
        out_dim: patch prototypes K.
        student_temp: student temperature (0.1).
        center_momentum: EMA momentum of the patch centre (0.9).
    """

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """Per-image mean over masked tokens of -sum_k P_t log P_s, summed over images / all images.

        Args:
            student_logits: (M, K) logits of the masked tokens, in `masks[masks]` order.
            teacher_probs: (M, K) teacher probabilities of the same tokens.
            masks: (B, N) bool masks that selected the M tokens; B counts every global-crop sample.
        """
        per_image = masks.sum(dim=1)
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0  # keeps the graph (DDP) with no masked tokens
        weights = (1.0 / per_image.clamp(min=1).float()).unsqueeze(1).expand_as(masks)[masks]
        ce = torch.sum(-teacher_probs * F.log_softmax(student_logits.float() / self.student_temp, dim=-1), -1)
        return (ce * weights).sum() / masks.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """c <- m c + (1 - m) mean over the masked tokens of every rank."""
        stats = torch.cat(
            [teacher_logits.float().sum(0), teacher_logits.new_tensor([teacher_logits.shape[0]])]
        )
        stats = all_reduce_sum(stats.float())
        if stats[-1] > 0:
            batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
