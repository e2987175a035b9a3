"""Training schedules as pure functions of the (global) step.

- Learning rate: linear warm-up from `warmup_start` to `base`, then half-cosine to `final`
  (DINO / MAE recipes; SPEC 2: warm-up 5 epochs (DINO) or 5% of steps (MAE), then cosine).
- Weight decay: cosine from 0.04 to 0.4 over training (DINO practice).
- Teacher temperature: linear warm-up 0.04 -> 0.07, then constant (DINO / DINOv2).
- Teacher EMA momentum: cosine from 0.994 to 1.0 over all steps (FM-CT, BYOL / DINO).

Pure functions make resumption trivial: a restored trainer only needs the global step.
"""

from __future__ import annotations

import math


def cosine_schedule(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up for `warmup_steps` (warmup_start -> base), then cosine base -> final.

    Steps at or beyond `total_steps` return `final`.
    """
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, base_lr: float, min_lr: float = 1e-6, warmup_steps: int = 0) -> float:
    """Learning rate: warm-up from 0 to `base_lr`, cosine decay to `min_lr`."""
    return cosine_schedule(step, total_steps, base_lr, min_lr, warmup_steps, 0.0)


def weight_decay_at(step: int, total_steps: int, start: float = 0.04, end: float = 0.4) -> float:
    """Weight decay: cosine from `start` to `end` (DINO)."""
    return cosine_schedule(step, total_steps, start, end)


def teacher_temp_at(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher temperature: linear `start` -> `end` over `warmup_steps`, then `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def momentum_at(step: int, total_steps: int, base: float = 0.994, final: float = 1.0) -> float:
    """Teacher EMA momentum: cosine from `base` to `final` over `total_steps`."""
    return cosine_schedule(step, total_steps, base, final)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: lr = base_lr * global_batch / reference_batch (SPEC 2)."""
    return base_lr * global_batch / reference_batch
