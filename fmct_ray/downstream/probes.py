"""Light probes on frozen-backbone features for every task category of VoxelFM's protocol but
report generation (issue 12): numpy in, numpy out, CPU or GPU, no Ray.

| kind | probe | input | trained with | selected on (each epoch, validation) |
|---|---|---|---|---|
| binary | `MLPHead` (hidden 1024, dropout 0.5, Gaussian feature noise 0.1) | CLS | BCE | AUROC |
| binary | kNN on cosine similarity, k in 1..101 (`knn_probe`) | CLS | nothing | AUROC |
| continuous | `MLPHead`, z-scored target | CLS | MSE | MAE |
| survival | `MLPHead`, risk score | CLS | Cox partial likelihood, Breslow ties (`cox_loss`) | C-index |
| point | `PositionalAttentionRegressor` | patch tokens + positions (mm) | L1 (mm) | mean distance |
| mask | `SegmentationHead` (1x1x1 conv, 3 conv blocks, upsampling) | patch tokens | CE + Dice | macro Dice |

Retrieval needs no probe (`fmct_ray.eval.task_metrics.recall_at_k` on CLS). `fit_probe` is the one
training loop: AdamW, a cosine lr, shuffled batches (survival: the whole pool per step, so that
every risk set is complete), the validation metric after every epoch, and the best epoch's weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmct_ray.eval.metrics import auroc
from fmct_ray.eval.task_metrics import c_index, dice_scores, localisation_error

Kind = Literal["binary", "continuous", "survival", "point", "mask"]


@dataclass(frozen=True)
class ProbeConfig:
    """A probe's training recipe (VoxelFM's MLP: hidden 1024, dropout 0.5, feature noise 0.1)."""

    hidden: int = 1024
    dropout: float = 0.5
    noise: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 50
    batch_size: int = 32
    seed: int = 0


# -- heads ----------------------------------------------------------------------------------------
class MLPHead(nn.Module):
    """Standardise (with the training pool's statistics), add Gaussian noise while training,
    Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, out: int, cfg: ProbeConfig) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.noise = cfg.noise
        self.net = nn.Sequential(
            nn.Linear(len(mean), cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.training and self.noise:
            x = x + self.noise * torch.randn_like(x)
        return self.net(x).squeeze(-1)


class PositionalAttentionRegressor(nn.Module):
    """VoxelFM's localisation head: patch tokens plus an embedding of their positions, one
    self-attention layer, a score per patch, and the softmax-weighted mean of the patch positions
    (so the prediction is a point inside the view, in the positions' units)."""

    def __init__(self, dim: int, positions: torch.Tensor, heads: int = 4) -> None:
        super().__init__()
        self.register_buffer("positions", positions.float())  # (N, 3), mm
        centre, scale = positions.float().mean(0), positions.float().std(0).clamp_min(1e-6)
        self.register_buffer("unit", (positions.float() - centre) / scale)
        self.norm_in = nn.LayerNorm(dim)
        self.pos = nn.Linear(3, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm_in(tokens) + self.pos(self.unit)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.score(self.norm(h)).squeeze(-1).softmax(-1)  # (B, N)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weights(tokens) @ self.positions  # (B, 3)


class SegmentationHead(nn.Module):
    """Patch tokens (B, N, D) on a `grid` -> a 1x1x1 projection to `width` channels -> 3 blocks of
    (3x3x3 conv, GroupNorm, GELU, trilinear upsampling), each halving the channels, towards
    `size`^3 -> per-class logits at `size`^3."""

    def __init__(self, dim: int, grid: tuple[int, int, int], n_classes: int, size: int, width: int = 64):
        super().__init__()
        self.grid = grid
        self.project = nn.Conv3d(dim, width, 1)
        widths = [width, width // 2, width // 4, width // 8]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(a, b, 3, padding=1), nn.GroupNorm(min(8, b), b), nn.GELU())
            for a, b in zip(widths, widths[1:])
        )
        steps = np.geomspace(grid[0], size, 4)[1:]  # three upsamplings to the view size
        self.sizes = [int(round(s)) for s in steps[:-1]] + [size]
        self.out = nn.Conv3d(widths[-1], n_classes, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        x = self.project(tokens.transpose(1, 2).reshape(b, d, *self.grid))
        for block, s in zip(self.blocks, self.sizes, strict=True):
            x = F.interpolate(block(x), size=(s, s, s), mode="trilinear", align_corners=False)
        return self.out(x)


# -- losses ---------------------------------------------------------------------------------------
def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's ties, per event:
    -(1 / #events) sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]."""
    event = event.bool()
    if not event.any():
        return risk.sum() * 0.0  # no event, no information (keeps the graph)
    at_risk = time[None, :] >= time[event][:, None]  # (events, n)
    log_sum = torch.logsumexp(risk[None, :].masked_fill(~at_risk, -torch.inf), dim=1)
    return -(risk[event] - log_sum).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the soft Dice loss of the foreground classes (1 - mean Dice over the
    classes present in the batch): small structures (ventricles fill well under 1% of a head's
    view) are not outweighed by the background, as with cross-entropy alone."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter, total = (probs * onehot).sum(dims)[1:], (probs + onehot).sum(dims)[1:]
    present = onehot.sum(dims)[1:] > 0
    dice = (2 * inter / total.clamp_min(1e-6))[present]
    return F.cross_entropy(logits, target) + (1 - dice.mean() if len(dice) else 0.0)


# -- training -------------------------------------------------------------------------------------
def fit_probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    validate: Callable[[nn.Module], float],
    cfg: ProbeConfig,
    full_batch: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Train `model` on (x, y); after every epoch `validate(model)` (higher is better) picks the
    weights kept. An epoch is ceil(n / batch_size) steps, each on a batch of `cfg.batch_size`
    rows, or on every row (`full_batch`: a loss over the whole pool, the Cox partial likelihood's
    complete risk sets). Returns (model with the best epoch's weights, history)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = cfg.batch_size
    steps = math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs * steps))
    best, state, history = -math.inf, None, []
    for epoch in range(cfg.epochs):
        model.train()
        order, losses = torch.randperm(len(x), generator=gen), []
        for s in range(steps):
            idx = order if full_batch else order[s * bs : (s + 1) * bs]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            score = validate(model)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val": score})
        if state is None or score > best:  # a NaN score (nothing to measure yet) never wins later
            best, state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    return model, history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def _seeded(cfg: ProbeConfig, module: type[nn.Module], *args) -> nn.Module:
    """`module(*args)` with its initial weights drawn from the probe's seed (not from whatever drew
    from torch's generator before): the same seed gives the same probe."""
    torch.manual_seed(cfg.seed)
    return module(*args)


def _tensor(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)  # a copy: inputs may be read-only


def mlp_probe(
    kind: Kind, x_train, y_train, x_val, y_val, cfg: ProbeConfig = ProbeConfig()
) -> Callable[[np.ndarray], np.ndarray]:
    """An MLP probe on CLS features for a binary, continuous or survival target; returns a
    function of features giving probabilities (binary), predictions in target units
    (continuous) or risk scores (survival: higher, earlier event).

    Targets: binary and continuous (n,); survival (n, 2) = (time, event)."""
    x, xv = _tensor(x_train), _tensor(x_val)
    y, yv = np.asarray(y_train, dtype=np.float64), np.asarray(y_val, dtype=np.float64)
    head = _seeded(cfg, MLPHead, x.mean(0), x.std(0).clamp_min(1e-6), 1, cfg)
    mean, std, full_batch = 0.0, 1.0, False
    if kind == "binary":
        loss = F.binary_cross_entropy_with_logits

        def validate(m: nn.Module) -> float:
            return auroc(yv, predict(m, xv))

    elif kind == "continuous":
        mean, std, loss = float(y.mean()), float(y.std()) or 1.0, F.mse_loss

        def validate(m: nn.Module) -> float:
            return -float(np.abs(predict(m, xv) * std + mean - yv).mean())

    elif kind == "survival":
        full_batch = True  # every step on the whole pool: complete risk sets

        def loss(risk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return cox_loss(risk, target[:, 0], target[:, 1])

        def validate(m: nn.Module) -> float:
            return c_index(yv[:, 0], yv[:, 1], predict(m, xv))

    else:
        raise ValueError(f"an MLP probe is for binary, continuous or survival targets, not {kind!r}")
    model, _ = fit_probe(head, x, _tensor((y - mean) / std), loss, validate, cfg, full_batch)

    def score(features: np.ndarray) -> np.ndarray:
        out = predict(model, _tensor(features))
        return 1 / (1 + np.exp(-out)) if kind == "binary" else out * std + mean

    return score


def knn_probe(
    x_train, y_train, x_val, y_val, ks=range(1, 102, 2)
) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """kNN classification on cosine similarity: a scan's score is the fraction of positives among
    its k most similar training scans; k (odd, 1..101, at most the pool) is the one with the best
    validation AUROC. Returns (k, scoring function)."""
    xt = np.asarray(x_train, dtype=np.float64)
    xt = xt / np.linalg.norm(xt, axis=1, keepdims=True).clip(1e-12)
    yt = np.asarray(y_train, dtype=np.float64)

    def scores(x: np.ndarray, k: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        sims = (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)) @ xt.T
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return yt[nearest].mean(1)

    candidates = [k for k in ks if k <= len(xt)]
    k = max(candidates, key=lambda k: auroc(y_val, scores(x_val, k)))
    return k, lambda x: scores(x, k)


def point_probe(
    tokens_train, points_train, tokens_val, points_val, positions, cfg: ProbeConfig = ProbeConfig()
) -> Callable[[np.ndarray], np.ndarray]:
    """`PositionalAttentionRegressor` on patch tokens (n, N, D) with patch centres `positions`
    (N, 3) in the points' frame (mm), L1 loss; selected on the validation mean distance error."""
    x, xv, y = _tensor(tokens_train), _tensor(tokens_val), _tensor(points_train)
    model = _seeded(cfg, PositionalAttentionRegressor, x.shape[-1], _tensor(positions))

    def validate(m: nn.Module) -> float:
        return -float(localisation_error(predict(m, xv, 64), points_val).mean())

    def loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        return (pred - true).abs().sum(-1).mean()

    model, _ = fit_probe(model, x, y, loss, validate, cfg)
    return lambda tokens: predict(model, _tensor(tokens), 64)


def mask_probe(
    tokens_train,
    masks_train,
    tokens_val,
    masks_val,
    grid: tuple[int, int, int],
    n_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
) -> Callable[[np.ndarray], np.ndarray]:
    """`SegmentationHead` on patch tokens (n, N, D) against label volumes (n, S, S, S), cross-
    entropy; selected on the validation macro Dice. Returns a function giving label volumes."""
    x, xv = _tensor(tokens_train), _tensor(tokens_val)
    y = torch.as_tensor(np.asarray(masks_train), dtype=torch.long)
    model = _seeded(cfg, SegmentationHead, x.shape[-1], grid, n_classes, y.shape[-1])

    def labels(m: nn.Module, tokens: torch.Tensor) -> np.ndarray:
        return predict(m, tokens, 8).argmax(1)

    def validate(m: nn.Module) -> float:
        return dice_scores(labels(m, xv), masks_val, n_classes)["dice_macro"]

    model, _ = fit_probe(model, x, y, segmentation_loss, validate, cfg)
    return lambda tokens: labels(model, _tensor(tokens))
