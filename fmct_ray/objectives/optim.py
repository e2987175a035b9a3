"""Optimiser helpers: parameter groups, layer-wise lr decay, schedule application, clipping.

- No weight decay on biases, norm parameters, position embeddings, CLS / register / mask tokens
  and LayerScale gammas (DINO / DINOv2 `get_params_groups`; anything 1-D is excluded too).
- Layer-wise learning-rate decay for fine-tuning (BEiT, Bao et al. 2022; MAE fine-tuning):
  block i gets `decay^(L + 1 - (i + 1))`, the embeddings `decay^(L + 1)`, heads 1.
- Each group carries `lr_scale` and `wd_scale`; `apply_schedule` sets the actual values every
  step from the pure schedules in `schedules.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_NO_DECAY = ("pos_embed", "cls_token", "register_tokens", "mask_token", "gamma", "query")
_EMBED = ("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings (SPEC 2 defaults for FM-CT DINO).

    Args:
        lr: base learning rate per 256 samples (scaled by global batch / 256).
        min_lr: final learning rate of the cosine.
        warmup_steps: linear warm-up steps (the trainer converts epochs to steps).
        weight_decay: start of the cosine weight-decay schedule.
        weight_decay_end: end of the weight-decay schedule.
        betas: AdamW betas.
        clip_grad: max global gradient norm, or 0 for none.
        layer_decay: layer-wise lr decay (1.0 = none; e.g. 0.75 when fine-tuning).
    """

    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 3.0
    layer_decay: float = 1.0


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for biases, norms, position embeddings, tokens, LayerScale and any 1-D parameter."""
    return param.ndim <= 1 or name.endswith(".bias") or "norm" in name or any(k in name for k in _NO_DECAY)


def layer_id(name: str, num_blocks: int) -> int:
    """0 for embeddings, i + 1 for `blocks.i`, num_blocks + 1 for the rest (final norm, heads)."""
    if "decoder" not in name:
        match = _BLOCK.search(name)
        if match:
            return int(match.group(1)) + 1
        if any(k in name for k in _EMBED):
            return 0
    return num_blocks + 1


def param_groups(model: nn.Module, layer_decay: float = 1.0, num_blocks: int | None = None) -> list[dict]:
    """AdamW parameter groups with `wd_scale` (0 or 1) and `lr_scale` (layer-wise decay).

    Args:
        model: any module; frozen parameters are skipped.
        layer_decay: per-block lr factor (1.0 disables it).
        num_blocks: transformer depth; inferred from `blocks.i` names when None.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if num_blocks is None:
        ids = [int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n)) and "decoder" not in n]
        num_blocks = max(ids) + 1 if ids else 0
    groups: dict[tuple[float, float], dict] = {}
    for name, p in named:
        wd_scale = 0.0 if is_no_decay(name, p) else 1.0
        lr_scale = layer_decay ** (num_blocks + 1 - layer_id(name, num_blocks))
        group = groups.setdefault((wd_scale, lr_scale), {"params": [], "names": [], "wd_scale": wd_scale})
        group["lr_scale"] = lr_scale
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, cfg.layer_decay)`; lr / wd are set by `apply_schedule`."""
    groups = param_groups(model, cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set every group's lr = lr * lr_scale and weight_decay = weight_decay * wd_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (0 = only measure); returns the norm before."""
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def cancel_last_layer_gradients(model: nn.Module, step: int, freeze_steps: int) -> None:
    """Drop the gradients of `last_layer` parameters while `step < freeze_steps` (DINO)."""
    if step >= freeze_steps:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
