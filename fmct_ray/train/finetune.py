"""Supervised fine-tuning and probing of one binary task (SPEC section 3).

Modes:
- "full": the backbone and a linear head on CLS are trained (AdamW, lr 1e-5 backbone / 1e-3 head,
  optional layer-wise lr decay, cosine schedule, at most 10 epochs).
- "linear": `LinearProbe` on the CLS token, backbone frozen.
- "attentive": `AttentiveProbe` (one attention-pooling layer) over all tokens, backbone frozen.
Any mode can start from an exported backbone or from random initialisation (scratch).

Each epoch draws a class-balanced sample of the training pool (5,000 samples; 500 for small
pools); a few-shot run's pool is K positives + K negatives. Model selection is by validation
AUROC after every epoch, and the selected state predicts the test split of every site (external
validation = the other sites' held-out splits).

Two input paths share one training loop (`fit`): volumes through `ViewLoader` (full fine-tuning,
scratch), and cached embeddings (`fmct_ray.data.embed`) for the frozen modes, which trains a probe
in seconds on a CPU. Nothing here depends on Ray: a Tune trial passes a `report` callback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fmct_ray.data.embed import BackboneConfig, build_backbone, matrix
from fmct_ray.eval.metrics import auroc
from fmct_ray.eval.views import ViewConfig, ViewLoader, to_model_input
from fmct_ray.models import AttentiveProbe, LinearProbe
from fmct_ray.objectives.optim import param_groups

Mode = Literal["full", "linear", "attentive"]


@dataclass(frozen=True)
class FinetuneOptim:
    """Optimiser of a fine-tuning run.

    Args:
        optimizer: "adamw", "adam" (L2 weight decay) or "sgd" (momentum).
        backbone_lr: peak lr of backbone parameters (full mode).
        head_lr: peak lr of the head.
        weight_decay: weight decay (none on biases, norms, tokens).
        layer_decay: layer-wise lr decay of the backbone (1.0: none).
        momentum: SGD momentum.
        warmup_epochs: linear warm-up before the cosine.
    """

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    backbone_lr: float = 1e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    momentum: float = 0.9
    warmup_epochs: float = 0.0


@dataclass(frozen=True)
class FinetuneTrain:
    """Length and sampling of a run.

    Args:
        epochs: training epochs (SPEC: at most 10; the scratch grid goes to 50).
        batch_size: samples per step.
        samples_per_epoch: class-balanced draw per epoch (SPEC: 5,000).
        small_samples_per_epoch: the draw for small pools (SPEC: 500).
        small_pool: pools with fewer labelled scans than this are small.
        shots: K positives + K negatives in the pool (0: every labelled training scan).
        seed: pool draw, epoch draws, head init.
        flip_prob: random flips of training views (volume path only).
        read_threads: parallel volume reads.
    """

    epochs: int = 10
    batch_size: int = 16
    samples_per_epoch: int = 5000
    small_samples_per_epoch: int = 500
    small_pool: int = 5000
    shots: int = 0
    seed: int = 0
    flip_prob: float = 0.0
    read_threads: int = 4


# -- sampling -------------------------------------------------------------------------------------
def few_shot_pool(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of K positives and K negatives drawn without replacement (all when shots == 0)."""
    if shots <= 0:
        return np.arange(len(y))
    rng = np.random.default_rng([seed, 1])
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) < shots or len(neg) < shots:
        raise ValueError(f"{shots}-shot needs {shots} positives and negatives; have {len(pos)} / {len(neg)}")
    return np.sort(np.r_[rng.choice(pos, shots, replace=False), rng.choice(neg, shots, replace=False)])


def balanced_draw(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices, half positives and half negatives (with replacement only when a class is too small)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg):
        raise ValueError("a class-balanced draw needs both classes in the training pool")
    half = n // 2
    idx = np.r_[
        rng.choice(pos, half, replace=half > len(pos)), rng.choice(neg, n - half, replace=n - half > len(neg))
    ]
    return rng.permutation(idx)


def epoch_size(pool: int, cfg: FinetuneTrain) -> int:
    return cfg.small_samples_per_epoch if pool < cfg.small_pool else cfg.samples_per_epoch


# -- models ---------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Backbone (optional: None on cached embeddings) + head producing one logit per sample."""

    def __init__(self, head: nn.Module, mode: Mode, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.head, self.mode, self.backbone = head, mode, backbone
        if backbone is not None and mode != "full":
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.backbone is not None and self.mode != "full":
            self.backbone.eval()  # frozen: no dropout / drop-path
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            with torch.set_grad_enabled(self.mode == "full" and torch.is_grad_enabled()):
                feats = self.backbone.forward_features(x)
            x = feats if self.mode == "attentive" else feats["cls"]
        return self.head(x).squeeze(-1)


def build_head(mode: Mode, dim: int) -> nn.Module:
    return AttentiveProbe(dim, 1) if mode == "attentive" else LinearProbe(dim, 1)


def build_optimizer(model: Classifier, cfg: FinetuneOptim) -> torch.optim.Optimizer:
    """Separate lrs for backbone (with layer-wise decay) and head; no decay on norms and biases."""
    groups = [dict(g, base_lr=cfg.head_lr) for g in param_groups(model.head)]
    if model.backbone is not None and model.mode == "full":
        groups += [dict(g, base_lr=cfg.backbone_lr) for g in param_groups(model.backbone, cfg.layer_decay)]
    for g in groups:
        g.pop("names", None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.head_lr, momentum=cfg.momentum)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg.head_lr)


def set_lr(optimizer: torch.optim.Optimizer, cfg: FinetuneOptim, step: int, total: int, warmup: int) -> None:
    """Warm-up then cosine to 0, per group: lr = base_lr * lr_scale * factor."""
    factor = (
        step / warmup
        if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    )
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * g.get("lr_scale", 1.0) * factor
        g["weight_decay"] = cfg.weight_decay * g.get("wd_scale", 1.0)


# -- one split's inputs -----------------------------------------------------------------------------
@dataclass
class Inputs:
    """Scans of one split and how to turn positions into a model input batch."""

    rows: pd.DataFrame  # scan_id, patient_id, site, split, label
    load: Callable[[np.ndarray, torch.Generator | None], torch.Tensor]

    @property
    def y(self) -> np.ndarray:
        return self.rows["label"].to_numpy().astype(np.int64)


def embedding_inputs(rows: pd.DataFrame, mode: Mode) -> Inputs:
    """Inputs from cached embeddings: CLS vectors (linear) or all tokens (attentive)."""
    if mode == "attentive":
        if "tokens" not in rows.columns:
            raise ValueError("attentive probes on embeddings need tokens (extract with tokens: true)")
        dim = len(rows["cls"].iloc[0])
        x = torch.from_numpy(matrix(rows, "tokens", dim))
    else:
        x = torch.from_numpy(matrix(rows, "cls"))
    return Inputs(rows.reset_index(drop=True), lambda idx, gen=None: x[torch.as_tensor(idx)])


def volume_inputs(
    rows: pd.DataFrame, loader: ViewLoader, view: ViewConfig, device: torch.device, flip_prob: float = 0.0
) -> Inputs:
    rows = rows.reset_index(drop=True)
    sites, ids = rows["site"].to_numpy(), rows["scan_id"].to_numpy()

    def load(idx: np.ndarray, gen: torch.Generator | None = None) -> torch.Tensor:
        views = loader(sites[idx], ids[idx])
        return to_model_input(views, view, device, flip_prob if gen is not None else 0.0, gen)

    return Inputs(rows, load)


# -- the loop -----------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, inputs: Inputs, batch_size: int = 64) -> np.ndarray:
    """Positive-class probabilities of every scan of `inputs`."""
    model.eval()
    out = [
        torch.sigmoid(model(inputs.load(np.arange(i, min(i + batch_size, len(inputs.rows)))))).float().cpu()
        for i in range(0, len(inputs.rows), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


@dataclass
class FitResult:
    best_val_auroc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    state: dict | None = None  # the selected weights
    model: nn.Module | None = None  # the trained classifier (set by `run_finetune`, not checkpointed)


def fit(
    model: Classifier,
    train: Inputs,
    val: Inputs,
    optim: FinetuneOptim,
    cfg: FinetuneTrain,
    report: Callable[[dict, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
) -> FitResult:
    """Train on balanced epoch draws, keep the state with the best validation AUROC.

    Args:
        model: classifier (its head, and backbone in full mode, are trained).
        train: training pool (after any few-shot draw).
        val: validation split (model selection).
        optim: optimiser settings.
        cfg: epochs, batch, draws, seed.
        report: called after every epoch with the metrics and a function returning the full state
            (a Tune trial saves it as its checkpoint).
        resume: a state from such a checkpoint; training continues after its epoch.
    """
    optimizer = build_optimizer(model, optim)
    n = epoch_size(len(train.rows), cfg)
    steps = max(1, math.ceil(n / cfg.batch_size))
    total, warmup = steps * cfg.epochs, int(optim.warmup_epochs * steps)
    result = FitResult(best_val_auroc=-1.0, best_epoch=-1)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        result = resume["result"]
        start = resume["epoch"]
    y = train.y
    for epoch in range(start, cfg.epochs):
        model.train()
        rng, gen = (
            np.random.default_rng([cfg.seed, epoch]),
            torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
        )
        order, losses = balanced_draw(y, n, rng), []
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            set_lr(optimizer, optim, epoch * steps + s, total, warmup)
            logits = model(train.load(idx, gen))
            loss = F.binary_cross_entropy_with_logits(
                logits, torch.as_tensor(y[idx], dtype=logits.dtype, device=logits.device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        val_auroc = auroc(val.y, predict(model, val, cfg.batch_size))
        if val_auroc > result.best_val_auroc:
            result.best_val_auroc, result.best_epoch = val_auroc, epoch + 1
            result.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "val_auroc": val_auroc,
            "best_val_auroc": result.best_val_auroc,
        }
        result.history.append(metrics)
        if report is not None:
            report(
                metrics,
                lambda e=epoch: {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "result": result,
                    "epoch": e + 1,
                },
            )
    if result.state is not None:
        model.load_state_dict(result.state)
    return result


# -- one run, end to end ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """The runs a sweep fans out (`fmct_ray.train.tune`; SPEC section 3).

    Args:
        tasks: tasks of the matrix (empty: the run's `task`).
        sites: training sites (empty: every site in the labels); each model is also evaluated on
            the test split of every other site.
        modes: modes of the fine-tuning matrix.
        shots: few-shot K values; 0 is the run on all labelled training scans.
        seeds: repeats of each few-shot run (different draws).
        full_data_seeds: repeats of the all-data runs.
        scratch_lrs: scratch grid, learning rates (backbone and head alike).
        scratch_weight_decays: scratch grid, weight decays.
        scratch_epochs: scratch grid, epochs.
        scratch_optimizers: scratch grid, optimisers (3 x 4 x 4 x 3 = 144 configurations).
        search: "grid" (every configuration) or "optuna" (Optuna TPE + ASHA early stopping).
        optuna_trials: trials per task and site of the Optuna search.
        asha_grace_epochs: epochs every trial runs before ASHA may stop it.
        asha_reduction: ASHA reduction factor.
    """

    tasks: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    modes: tuple[Mode, ...] = ("linear", "attentive", "full")
    shots: tuple[int, ...] = (0, 8, 16, 32, 64, 128, 256)
    seeds: int = 5
    full_data_seeds: int = 1
    scratch_lrs: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    scratch_weight_decays: tuple[float, ...] = (0.01, 0.05, 1e-4, 1e-5)
    scratch_epochs: tuple[int, ...] = (10, 15, 30, 50)
    scratch_optimizers: tuple[Literal["sgd", "adam", "adamw"], ...] = ("sgd", "adam", "adamw")
    search: Literal["grid", "optuna"] = "grid"
    optuna_trials: int = 24
    asha_grace_epochs: int = 2
    asha_reduction: float = 3.0


@dataclass(frozen=True)
class FinetuneConfig:
    """Root config of `configs/finetune/*.yaml`: one task's run, plus the sweep around it.

    Args:
        task: label column to train on.
        mode: "full", "linear" or "attentive".
        backbone: exported backbone, or a preset with random weights (scratch).
        view: evaluation view.
        optim: optimiser.
        train: epochs, draws, few-shot K, seed.
        fast_path: frozen modes train on cached embeddings instead of volumes.
        sweep: the matrix of runs and the scratch grid (`fmct_ray.train.tune`).
    """

    task: str = "Hydrocephalus"
    mode: Mode = "linear"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    fast_path: bool = True
    sweep: SweepConfig = field(default_factory=SweepConfig)


def labelled(table: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows with a known label for `task` (missing labels are left out, never negatives)."""
    if task not in table.columns:
        raise ValueError(f"no label column {task!r}; have {[c for c in table.columns if c[0].isupper()]}")
    rows = table[table[task].notna()].copy()
    rows["label"] = rows[task].astype(int)
    return rows


def split_rows(table: pd.DataFrame, task: str, site: str) -> dict[str, pd.DataFrame]:
    """train / val of `site`, and the test split of every site (external validation)."""
    rows = labelled(table, task)
    out = {s: rows[(rows["site"] == site) & (rows["split"] == s)] for s in ("train", "val")}
    for s, part in out.items():
        if part["label"].nunique() < 2:
            raise ValueError(
                f"task {task}, site {site}: the {s} split needs both classes ({len(part)} scans)"
            )
    out["test"] = rows[rows["split"] == "test"]
    return out


def run_finetune(
    cfg: FinetuneConfig,
    table: pd.DataFrame,
    site: str,
    stores: dict[str, str] | None = None,
    report=None,
    resume: dict | None = None,
) -> tuple[FitResult, pd.DataFrame]:
    """Train `cfg.task` on `site` and predict the test split of every site.

    Args:
        cfg: the run.
        table: labels joined with embeddings (fast path) or labels only (volume path): scan_id,
            patient_id, site, split, task columns [, cls, tokens].
        site: training site.
        stores: site -> store URI (volume path).
        report, resume: see `fit`.

    Returns:
        (fit result, test predictions: scan_id, patient_id, site, split, label, score).
    """
    parts = split_rows(table, cfg.task, site)
    parts["train"] = parts["train"].iloc[
        few_shot_pool(parts["train"]["label"].to_numpy(), cfg.train.shots, cfg.train.seed)
    ]
    torch.manual_seed(cfg.train.seed)
    if cfg.fast_path and cfg.mode != "full":
        inputs = {k: embedding_inputs(v, cfg.mode) for k, v in parts.items()}
        model = Classifier(build_head(cfg.mode, len(table["cls"].iloc[0])), cfg.mode)
    else:
        if not stores:
            raise ValueError("the volume path needs the site stores")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loader = ViewLoader(stores, cfg.view, threads=cfg.train.read_threads)
        backbone = build_backbone(cfg.backbone)
        model = Classifier(build_head(cfg.mode, backbone.embed_dim), cfg.mode, backbone).to(device)
        inputs = {
            k: volume_inputs(v, loader, cfg.view, device, cfg.train.flip_prob if k == "train" else 0.0)
            for k, v in parts.items()
        }
    result = fit(model, inputs["train"], inputs["val"], cfg.optim, cfg.train, report, resume)
    result.model = model
    test = inputs["test"]
    preds = test.rows[["scan_id", "patient_id", "site", "split", "label"]].assign(
        score=predict(model, test, cfg.train.batch_size)
    )
    return result, preds
