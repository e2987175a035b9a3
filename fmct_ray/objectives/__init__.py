"""Self-supervised objectives: DINO, iBOT, KoLeo, MAE losses; masking; schedules; optimiser helpers.

One file per loss (DINOv2 layout); each loss owns its global statistics and all-reduces them only
when `torch.distributed` is initialised. `tasks.py` assembles them into `DINOTask` / `MAETask`,
which share the `Task` interface a training loop uses. No Ray, no device calls.
"""

from fmct_ray.objectives.dino import DINOLoss
from fmct_ray.objectives.ibot import IBOTPatchLoss
from fmct_ray.objectives.koleo import KoLeoLoss
from fmct_ray.objectives.mae import mae_loss
from fmct_ray.objectives.masking import block_mask_3d, ibot_masks, random_masks
from fmct_ray.objectives.optim import (
    OptimConfig,
    apply_schedule,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    is_no_decay,
    layer_id,
    param_groups,
)
from fmct_ray.objectives.schedules import (
    Progress,
    cosine_schedule,
    lr_at,
    momentum_at,
    scaled_lr,
    teacher_temp_at,
    weight_decay_at,
)
from fmct_ray.objectives.tasks import (
    VOXELFM_DINO,
    DINOConfig,
    DINOModel,
    DINOTask,
    MAEConfig,
    MAETask,
    Task,
    entropies,
    spread,
    unwrap,
)

__all__ = [
    "VOXELFM_DINO",
    "DINOConfig",
    "DINOLoss",
    "DINOModel",
    "DINOTask",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MAEConfig",
    "MAETask",
    "OptimConfig",
    "Progress",
    "Task",
    "apply_schedule",
    "block_mask_3d",
    "build_optimizer",
    "cancel_last_layer_gradients",
    "clip_gradients",
    "cosine_schedule",
    "entropies",
    "ibot_masks",
    "is_no_decay",
    "layer_id",
    "lr_at",
    "mae_loss",
    "momentum_at",
    "param_groups",
    "random_masks",
    "scaled_lr",
    "spread",
    "teacher_temp_at",
    "unwrap",
    "weight_decay_at",
]
