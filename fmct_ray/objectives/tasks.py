"""Self-supervised tasks: DINO (+ iBOT + KoLeo) self-distillation and MAE.

A task is an `nn.Module` whose `forward` returns a dict of scalar losses, `"loss"` being the one to
back-propagate. It holds the trainable modules and the loss state (centres) so that
`task.state_dict()` is everything a checkpoint needs besides the optimiser.

Distributed use (the task never reads ranks or devices itself): only the student is wrapped,
the EMA teacher stays a plain module (as in timm / DINO). Preferred:

    task.wrap_student(lambda m: DDP(m, device_ids=[local_rank]))   # or ray.train.torch.prepare_model

which keeps `task.state_dict()` keys unchanged. Assigning `task.student = DDP(task.student)` also
works (the task unwraps `.module` where it needs the raw module), but then checkpoint keys gain a
`module.` infix. Masks for iBOT / MAE come from `task.mask_generator` (a CPU `torch.Generator`
seeded with `mask_seed`); reseed it per rank (`task.mask_generator.manual_seed(seed + rank)`), or
pass masks to `forward` (e.g. built in the data pipeline).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fmct_ray.models.heads import DINOHead
from fmct_ray.models.mae import MaskedAutoencoder3D, patchify
from fmct_ray.models.registry import create_model
from fmct_ray.models.vit3d import VisionTransformer3D
from fmct_ray.objectives.dino import DINOLoss
from fmct_ray.objectives.ibot import IBOTPatchLoss
from fmct_ray.objectives.koleo import KoLeoLoss
from fmct_ray.objectives.mae import mae_loss
from fmct_ray.objectives.masking import ibot_masks, random_masks
from fmct_ray.objectives.optim import cancel_last_layer_gradients
from fmct_ray.objectives.schedules import momentum_at, teacher_temp_at


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / FSDP-style wrapper (`.module`), or the module itself."""
    return getattr(module, "module", module)


@dataclass(frozen=True)
class DINOConfig:
    """DINO task settings; defaults are the FM-CT recipe (SPEC 2), `VOXELFM_DINO` the VoxelFM one.

    Step counts are global optimiser steps (the trainer converts epochs with `dataclasses.replace`).
    """

    model: str = "vit3d_base"
    drop_path_rate: float | None = None  # overrides the preset's when set
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    n_prototypes: int = 65536
    norm_last_layer: bool = True  # freeze the prototype norms
    freeze_last_layer_steps: int = 0  # FM-CT: the first epoch
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.994
    final_momentum_teacher: float = 1.0
    total_steps: int = 100_000  # horizon of the teacher momentum cosine
    ibot_weight: float = 0.0  # 0 disables iBOT (FM-CT); 1.0 in DINOv2 / VoxelFM
    ibot_separate_head: bool = True
    ibot_n_prototypes: int = 65536
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    mask_fraction: float = 0.5  # fraction of global-crop samples that are masked
    koleo_weight: float = 0.0  # 0.1 in DINOv2 / VoxelFM
    mask_seed: int = 0


VOXELFM_DINO = DINOConfig(model="vit3d_voxelfm_base", ibot_weight=1.0, koleo_weight=0.1)


def _runs(crops: list[Tensor]) -> list[Tensor]:
    """Concatenate consecutive crops of equal shape (one backbone call per size, order kept)."""
    return [torch.cat(list(group)) for _, group in itertools.groupby(crops, key=lambda t: t.shape)]


class DINOModel(nn.Module):
    """Backbone + DINO head (+ iBOT head): the student, and (deep-copied) the teacher.

    Args:
        backbone: a `VisionTransformer3D`.
        dino_head: head on the CLS token.
        ibot_head: head on masked patch tokens; None shares `dino_head` (or disables iBOT).
    """

    def __init__(self, backbone: VisionTransformer3D, dino_head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def _patch_logits(self, patch: Tensor, masks: Tensor) -> Tensor:
        head = self.ibot_head if self.ibot_head is not None else self.dino_head
        return head(patch[masks])

    def forward(self, global_crops: list[Tensor], local_crops: list[Tensor], masks: Tensor | None = None):
        """Student pass, one call so DDP sees a single forward per step.

        Args:
            global_crops: G tensors (B, C, D, H, W) of equal shape.
            local_crops: L tensors (B, C, d, h, w); equal-shape neighbours share one backbone call.
            masks: (G*B, N) bool iBOT masks for the concatenated global crops, or None.

        Returns:
            {"cls_logits": ((G+L)*B, K) views in input order, "global_cls": (G*B, D) backbone CLS,
            "patch_logits": (M, K') masked-token logits (only with masks)}.
        """
        feats = self.backbone.forward_features(torch.cat(global_crops), masks)
        cls = [feats["cls"]] + [self.backbone.forward_features(x)["cls"] for x in _runs(local_crops)]
        out = {"cls_logits": self.dino_head(torch.cat(cls)), "global_cls": feats["cls"]}
        if masks is not None:
            out["patch_logits"] = self._patch_logits(feats["patch"], masks)
        return out

    @torch.no_grad()
    def forward_teacher(self, global_crops: list[Tensor], masks: Tensor | None = None) -> dict[str, Tensor]:
        """Teacher pass on unmasked global crops; patch logits at the student's masked positions."""
        feats = self.backbone.forward_features(torch.cat(global_crops))
        out = {"cls_logits": self.dino_head(feats["cls"])}
        if masks is not None:
            out["patch_logits"] = self._patch_logits(feats["patch"], masks)
        return out


class DINOTask(nn.Module):
    """DINO self-distillation with an EMA teacher (Caron et al. 2021), iBOT and KoLeo (DINOv2).

    `forward(global_crops, local_crops, step, masks=None) -> {"loss", "dino", "ibot", "koleo"}`.
    Per step: `out = task(g, l, step); out["loss"].backward(); task.cancel_last_layer_grads(step);
    clip; optimizer.step(); task.update_teacher(step)`. Optimise `task.student.parameters()` only.
    The centres (`dino_loss.center`, `ibot_loss.center`) are buffers in `state_dict()`; they are
    updated inside `forward` in training mode, after the losses used them.
    """

    def __init__(self, cfg: DINOConfig = DINOConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        overrides = {} if cfg.drop_path_rate is None else {"drop_path_rate": cfg.drop_path_rate}
        backbone = create_model(cfg.model, **overrides)
        dino_head = self._head(backbone.embed_dim, cfg.n_prototypes)
        ibot_head = None
        if cfg.ibot_weight > 0 and cfg.ibot_separate_head:
            ibot_head = self._head(backbone.embed_dim, cfg.ibot_n_prototypes)
        if cfg.ibot_weight <= 0:
            backbone.mask_token.requires_grad_(False)  # unused: keeps DDP free of unused params
        self.student = DINOModel(backbone, dino_head, ibot_head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.dino_loss = DINOLoss(cfg.n_prototypes, cfg.student_temp, cfg.center_momentum)
        patch_k = cfg.ibot_n_prototypes if ibot_head is not None else cfg.n_prototypes
        self.ibot_loss = (
            IBOTPatchLoss(patch_k, cfg.student_temp, cfg.center_momentum) if cfg.ibot_weight > 0 else None
        )
        self.koleo_loss = KoLeoLoss()
        self.mask_generator = torch.Generator().manual_seed(cfg.mask_seed)
        self._wrapped: nn.Module | None = None

    def _head(self, in_dim: int, out_dim: int) -> DINOHead:
        c = self.cfg
        return DINOHead(
            in_dim, out_dim, c.head_hidden_dim, c.head_bottleneck_dim, c.head_nlayers, c.norm_last_layer
        )

    @property
    def student_module(self) -> DINOModel:
        return unwrap(self.student)

    def wrap_student(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Run the student through `wrapper(student)` (e.g. DDP) without changing state-dict keys."""
        object.__setattr__(self, "_wrapped", wrapper(self.student))

    def train(self, mode: bool = True) -> DINOTask:
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher
        return self

    def sample_masks(self, global_crops: list[Tensor]) -> Tensor:
        """iBOT masks (G*B, N) for the concatenated global crops, drawn from `mask_generator`."""
        grid = self.student_module.backbone.patch_embed.grid(global_crops[0].shape)
        n = len(global_crops) * global_crops[0].shape[0]
        masks = ibot_masks(n, grid, self.cfg.mask_ratio_range, self.cfg.mask_fraction, self.mask_generator)
        return masks.to(global_crops[0].device)

    def teacher_temp(self, step: int) -> float:
        c = self.cfg
        return teacher_temp_at(step, c.warmup_teacher_temp_steps, c.warmup_teacher_temp, c.teacher_temp)

    @torch.no_grad()
    def teacher_probs(self, global_crops: list[Tensor], step: int, masks: Tensor | None = None) -> dict:
        """Centred, sharpened teacher distributions: {"cls": (G*B, K), "patch": (M, K') if masks}."""
        t = self.teacher.forward_teacher(global_crops, masks)
        temp = self.teacher_temp(step)
        out = {"cls": self.dino_loss.teacher_probs(t["cls_logits"], temp), "cls_logits": t["cls_logits"]}
        if masks is not None:
            out["patch"] = self.ibot_loss.teacher_probs(t["patch_logits"], temp)
            out["patch_logits"] = t["patch_logits"]
        return out

    def forward(
        self, global_crops: list[Tensor], local_crops: list[Tensor], step: int, masks: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One DINO step's losses.

        Args:
            global_crops: G tensors (B, C, D, H, W), e.g. 2 x (B, 3, 96, 96, 96).
            local_crops: L tensors (B, C, d, h, w); their size may differ from the global one.
            step: global optimiser step (teacher temperature schedule).
            masks: (G*B, N) iBOT masks; sampled from `mask_generator` when iBOT is on and None.
        """
        b = global_crops[0].shape[0]
        if self.ibot_loss is None:
            masks = None
        elif masks is None:
            masks = self.sample_masks(global_crops)
        t = self.teacher_probs(global_crops, step, masks)
        s = (self._wrapped or self.student)(global_crops, local_crops, masks)
        dino = self.dino_loss(list(s["cls_logits"].split(b)), list(t["cls"].split(b)))
        zero = dino.new_zeros(())
        ibot = self.ibot_loss(s["patch_logits"], t["patch"], masks) if masks is not None else zero
        koleo = zero
        if self.cfg.koleo_weight > 0:  # DINOv2: summed over the global crops
            koleo = sum(self.koleo_loss(c) for c in s["global_cls"].split(b))
        if self.training:
            self.dino_loss.update_center(t["cls_logits"])
            if masks is not None:
                self.ibot_loss.update_center(t["patch_logits"])
        loss = dino + self.cfg.ibot_weight * ibot + self.cfg.koleo_weight * koleo
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        """teacher <- m teacher + (1 - m) student, m from the cosine momentum schedule; returns m."""
        c = self.cfg
        m = momentum_at(step, c.total_steps, c.momentum_teacher, c.final_momentum_teacher)
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student_module.parameters()]
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1 - m)
        return m

    def cancel_last_layer_grads(self, step: int) -> None:
        """Drop prototype-layer gradients during the first `freeze_last_layer_steps` steps (DINO)."""
        cancel_last_layer_gradients(self.student_module, step, self.cfg.freeze_last_layer_steps)


@dataclass(frozen=True)
class MAEConfig:
    """MAE task settings (SPEC 2; He et al. 2022 defaults)."""

    model: str = "vit3d_base"
    drop_path_rate: float | None = None
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    mask_seed: int = 0


class MAETask(nn.Module):
    """Masked autoencoding (He et al. 2022): `forward(images, step, mask=None) -> {"loss", "mae"}`.

    `task.model` (encoder + decoder) is the module to optimise and to wrap for DDP
    (`task.wrap_model(fn)`, or assign `task.model = DDP(task.model)`); `task.encoder` is the
    backbone to export with `save_backbone`.
    """

    def __init__(self, cfg: MAEConfig = MAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        overrides = {} if cfg.drop_path_rate is None else {"drop_path_rate": cfg.drop_path_rate}
        encoder = create_model(cfg.model, **overrides)
        encoder.mask_token.requires_grad_(False)  # masked tokens are dropped, never replaced
        self.model = MaskedAutoencoder3D(encoder, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
        self.mask_generator = torch.Generator().manual_seed(cfg.mask_seed)
        self._wrapped: nn.Module | None = None

    @property
    def encoder(self) -> VisionTransformer3D:
        return unwrap(self.model).encoder

    def wrap_model(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Run the model through `wrapper(model)` (e.g. DDP) without changing state-dict keys."""
        object.__setattr__(self, "_wrapped", wrapper(self.model))

    def sample_masks(self, images: Tensor) -> Tensor:
        """(B, N) masks with exactly round(mask_ratio * N) masked patches per sample."""
        grid = self.encoder.patch_embed.grid(images.shape)
        n = grid[0] * grid[1] * grid[2]
        masks = random_masks(images.shape[0], n, self.cfg.mask_ratio, self.mask_generator)
        return masks.to(images.device)

    def forward(self, images: Tensor, step: int = 0, mask: Tensor | None = None) -> dict[str, Tensor]:
        """MSE on masked patches. `step` is accepted for a uniform task interface (MAE has no
        step-dependent state); `mask` (B, N) bool overrides the sampled mask."""
        mask = self.sample_masks(images) if mask is None else mask
        pred = (self._wrapped or self.model)(images, mask)
        target = patchify(images, self.encoder.patch_size)
        loss = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return {"loss": loss, "mae": loss.detach()}
