"""Self-supervised tasks: DINO (+ iBOT + KoLeo) self-distillation and MAE.

A task is an `nn.Module` holding the trainable modules and the loss state (centres), so that
`task.state_dict()` is everything a checkpoint needs besides the optimiser. Both tasks have one
interface (`Task`), which is all a training loop uses:

    model = task.wrap(lambda m: DDP(m))     # optional: wraps `task.trainable` only
    optimizer = AdamW(task.trainable.parameters())
    p = Progress(samples, total_samples)    # samples consumed once this step completes
    out = task(global_crops, local_crops, p)   # {"loss": to back-propagate, other terms, monitors}
    out["loss"].backward(); task.after_backward(p); clip; optimizer.step()
    logged = task.after_step(p)             # DINO: EMA teacher update -> {"momentum", "teacher_temp"}
    save_backbone(path, task.backbone_to_export())   # DINO teacher backbone, MAE encoder

Distributed use (the task never reads ranks or devices itself): only the trainable module is
wrapped, the EMA teacher stays a plain module (as in timm / DINO); `wrap` keeps
`task.state_dict()` keys unchanged. Assigning `task.student = DDP(task.student)` also works (the
task unwraps `.module` where it needs the raw module), but then checkpoint keys gain a `module.`
infix. Masks for iBOT / MAE come from `task.mask_generator` (a CPU `torch.Generator` seeded with
`mask_seed`); reseed it per rank and step, or pass masks to `forward`.

Monitors (detached, cheap; DINO): `teacher_entropy` (mean over samples of the entropy of the
teacher's prototype distribution), `teacher_marginal_entropy` (entropy of the batch-mean
distribution), `student_cls_std` / `teacher_cls_std` (backbone CLS: mean over dimensions of the
std across the batch) and `log_k` (log of the prototype count, the uniform distribution's entropy).
Collapse to one prototype drives the marginal entropy to 0, collapse to uniform outputs drives the
per-sample entropy to log K; a CLS spread near 0 means every sample has the same embedding.
"""

from __future__ import annotations

import copy
import itertools
import math
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
from fmct_ray.objectives.schedules import Progress, momentum_at, teacher_temp_at


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / FSDP-style wrapper (`.module`), or the module itself."""
    return getattr(module, "module", module)


@torch.no_grad()
def entropies(probs: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over rows of H(p), H(mean of the rows)) in nats, for (n, K) probabilities."""

    def h(p: Tensor) -> Tensor:
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    probs = probs.float()
    return h(probs).mean(), h(probs.mean(0))


@torch.no_grad()
def spread(x: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std across the rows of (n, D): 0 if all rows agree."""
    return x.float().std(0).mean()


@dataclass(frozen=True)
class DINOConfig:
    """DINO task settings; defaults are the FM-CT recipe (SPEC 2), `VOXELFM_DINO` the VoxelFM one.

    Schedule lengths count samples of the run (the trainer converts epochs with `dataclasses.replace`);
    the run's planned total comes with each step's `Progress`.
    """

    model: str = "vit3d_base"
    drop_path_rate: float | None = None  # overrides the preset's when set
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_use_bn: bool = False  # BatchNorm in the heads' MLP (the teacher's uses batch statistics)
    n_prototypes: int = 65536
    norm_last_layer: bool = True  # freeze the prototype norms
    freeze_last_layer_samples: int = 0  # FM-CT: the first epoch
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # FM-CT; VoxelFM / DINOv2 warm 0.04 -> 0.07 (never 0.07 unwarmed)
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_samples: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.994
    final_momentum_teacher: float = 1.0
    ibot_weight: float = 0.0  # 0 disables iBOT (FM-CT); 1.0 in DINOv2 / VoxelFM
    ibot_separate_head: bool = True
    ibot_n_prototypes: int = 65536
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)
    mask_fraction: float = 0.5  # fraction of global-crop samples that are masked
    koleo_weight: float = 0.0  # 0.1 in DINOv2 / VoxelFM
    mask_seed: int = 0


# The teacher-temperature warm-up to 0.07 is a sample count: set by the trainer from
# `train.teacher_temp_warmup_epochs` (configs/pretrain/voxelfm_dinov2.yaml).
VOXELFM_DINO = DINOConfig(model="vit3d_voxelfm_base", ibot_weight=1.0, koleo_weight=0.1)


def _runs(crops: list[Tensor]) -> list[Tensor]:
    """Concatenate consecutive crops of equal shape (one backbone call per size, order kept)."""
    return [torch.cat(list(group)) for _, group in itertools.groupby(crops, key=lambda t: t.shape)]


class Task(nn.Module):
    """What a training loop sees of a self-supervised task (see the module docstring).

    Subclasses set `trainable`, `forward(global_crops, local_crops, progress)` and
    `backbone_to_export`; the hooks default to no-ops.
    """

    _wrapped: nn.Module | None = None

    @property
    def trainable(self) -> nn.Module:
        """The (unwrapped) module whose parameters the optimiser updates."""
        raise NotImplementedError

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Run `trainable` through `wrapper` (e.g. DDP) in `forward`, state-dict keys unchanged;
        returns the wrapped module."""
        object.__setattr__(self, "_wrapped", wrapper(self.trainable))
        return self._wrapped

    def after_backward(self, progress: Progress) -> None:
        """Between backward and the optimiser step (gradient surgery)."""

    def after_step(self, progress: Progress) -> dict[str, float]:
        """After the optimiser step; returns the schedule values to log."""
        return {}

    def backbone_to_export(self) -> VisionTransformer3D:
        raise NotImplementedError


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
        out = {"cls_logits": self.dino_head(feats["cls"]), "cls": feats["cls"]}
        if masks is not None:
            out["patch_logits"] = self._patch_logits(feats["patch"], masks)
        return out


class DINOTask(Task):
    """DINO self-distillation with an EMA teacher (Caron et al. 2021), iBOT and KoLeo (DINOv2).

    `forward(global_crops, local_crops, progress, masks=None) -> {"loss", "dino", "ibot", "koleo",
    monitors}`. `trainable` is the student; `after_backward` drops the prototype layer's gradients
    while frozen; `after_step` updates the EMA teacher. The centres (`dino_loss.center`,
    `ibot_loss.center`) are buffers in `state_dict()`; they are updated inside `forward` in
    training mode, after the losses used them.
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

    def _head(self, in_dim: int, out_dim: int) -> DINOHead:
        c = self.cfg
        return DINOHead(
            in_dim,
            out_dim,
            c.head_hidden_dim,
            c.head_bottleneck_dim,
            c.head_nlayers,
            c.norm_last_layer,
            c.head_use_bn,
        )

    @property
    def student_module(self) -> DINOModel:
        return unwrap(self.student)

    @property
    def trainable(self) -> DINOModel:
        return self.student_module

    def backbone_to_export(self) -> VisionTransformer3D:
        return self.teacher.backbone

    def train(self, mode: bool = True) -> DINOTask:
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher
        for m in self.teacher.modules():  # but batch statistics in its head's BatchNorm, as the student
            if isinstance(m, nn.BatchNorm1d):
                m.train(mode)
        return self

    def sample_masks(self, global_crops: list[Tensor]) -> Tensor:
        """iBOT masks (G*B, N) for the concatenated global crops, drawn from `mask_generator`."""
        grid = self.student_module.backbone.patch_embed.grid(global_crops[0].shape)
        n = len(global_crops) * global_crops[0].shape[0]
        masks = ibot_masks(n, grid, self.cfg.mask_ratio_range, self.cfg.mask_fraction, self.mask_generator)
        return masks.to(global_crops[0].device)

    def teacher_temp(self, progress: Progress) -> float:
        c = self.cfg
        return teacher_temp_at(
            progress.samples, c.warmup_teacher_temp_samples, c.warmup_teacher_temp, c.teacher_temp
        )

    @torch.no_grad()
    def teacher_probs(self, global_crops: list[Tensor], progress: Progress, masks: Tensor | None = None):
        """Centred, sharpened teacher distributions: {"cls": (G*B, K), "patch": (M, K') if masks},
        with the raw logits ("cls_logits", "patch_logits") and the backbone CLS ("cls_features")."""
        t = self.teacher.forward_teacher(global_crops, masks)
        temp = self.teacher_temp(progress)
        out = {
            "cls": self.dino_loss.teacher_probs(t["cls_logits"], temp),
            "cls_logits": t["cls_logits"],
            "cls_features": t["cls"],
        }
        if masks is not None:
            out["patch"] = self.ibot_loss.teacher_probs(t["patch_logits"], temp)
            out["patch_logits"] = t["patch_logits"]
        return out

    def forward(
        self,
        global_crops: list[Tensor],
        local_crops: list[Tensor],
        progress: Progress,
        masks: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One DINO step's losses and monitors (see the module docstring).

        Args:
            global_crops: G tensors (B, C, D, H, W), e.g. 2 x (B, 3, 96, 96, 96).
            local_crops: L tensors (B, C, d, h, w); their size may differ from the global one.
            progress: samples of the run (teacher temperature schedule).
            masks: (G*B, N) iBOT masks; sampled from `mask_generator` when iBOT is on and None.
        """
        b = global_crops[0].shape[0]
        if self.ibot_loss is None:
            masks = None
        elif masks is None:
            masks = self.sample_masks(global_crops)
        t = self.teacher_probs(global_crops, progress, masks)
        s = (self._wrapped if self._wrapped is not None else self.student)(global_crops, local_crops, masks)
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
        entropy, marginal = entropies(t["cls"])
        return {
            "loss": loss,
            "dino": dino.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach(),
            "teacher_entropy": entropy,
            "teacher_marginal_entropy": marginal,
            "student_cls_std": spread(s["global_cls"].detach()),
            "teacher_cls_std": spread(t["cls_features"]),
            "log_k": zero.new_tensor(math.log(self.cfg.n_prototypes)),
        }

    def after_backward(self, progress: Progress) -> None:
        """Drop the prototype layer's gradients in the steps whose samples all lie within the first
        `freeze_last_layer_samples` (DINO): the step's last sample is number `progress.samples - 1`."""
        cancel_last_layer_gradients(
            self.student_module, progress.samples - 1, self.cfg.freeze_last_layer_samples
        )

    @torch.no_grad()
    def after_step(self, progress: Progress) -> dict[str, float]:
        """teacher <- m teacher + (1 - m) student, m on the cosine momentum schedule (exactly
        `final_momentum_teacher` at the planned total); returns {"momentum", "teacher_temp"}."""
        c = self.cfg
        m = momentum_at(progress.samples, progress.total, c.momentum_teacher, c.final_momentum_teacher)
        t_params = list(self.teacher.parameters())
        s_params = [p.detach() for p in self.student_module.parameters()]
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1 - m)
        return {"momentum": m, "teacher_temp": self.teacher_temp(progress)}


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


class MAETask(Task):
    """Masked autoencoding (He et al. 2022) on the first global view:
    `forward(global_crops, local_crops=(), progress=None, mask=None) -> {"loss", "mae"}`.

    `trainable` is `task.model` (encoder + decoder); `backbone_to_export()` is the encoder.
    """

    def __init__(self, cfg: MAEConfig = MAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        overrides = {} if cfg.drop_path_rate is None else {"drop_path_rate": cfg.drop_path_rate}
        encoder = create_model(cfg.model, **overrides)
        encoder.mask_token.requires_grad_(False)  # masked tokens are dropped, never replaced
        self.model = MaskedAutoencoder3D(encoder, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
        self.mask_generator = torch.Generator().manual_seed(cfg.mask_seed)

    @property
    def trainable(self) -> MaskedAutoencoder3D:
        return unwrap(self.model)

    @property
    def encoder(self) -> VisionTransformer3D:
        return self.trainable.encoder

    def backbone_to_export(self) -> VisionTransformer3D:
        return self.encoder

    def sample_masks(self, images: Tensor) -> Tensor:
        """(B, N) masks with exactly round(mask_ratio * N) masked patches per sample."""
        grid = self.encoder.patch_embed.grid(images.shape)
        n = grid[0] * grid[1] * grid[2]
        masks = random_masks(images.shape[0], n, self.cfg.mask_ratio, self.mask_generator)
        return masks.to(images.device)

    def forward(
        self,
        global_crops: list[Tensor],
        local_crops: list[Tensor] = (),
        progress: Progress | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """MSE on the masked patches of `global_crops[0]` (B, C, D, H, W); other views and
        `progress` are unused (MAE has no schedule of its own); `mask` (B, N) bool overrides the
        sampled mask."""
        images = global_crops[0]
        mask = self.sample_masks(images) if mask is None else mask
        pred = (self._wrapped if self._wrapped is not None else self.model)(images, mask)
        target = patchify(images, self.encoder.patch_size)
        loss = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        return {"loss": loss, "mae": loss.detach()}
