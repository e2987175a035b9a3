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
in seconds on a CPU. Nothing here depends on Ray: a Tune trial passes a `report` callback. The
recipe (`FinetuneConfig`), the epoch draws and the label splits are in
`fmct_ray.downstream.config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fmct_ray.data.embed import build_backbone, matrix
from fmct_ray.data.views import ViewConfig, ViewLoader, to_model_input
from fmct_ray.downstream.config import (
    Features,
    FinetuneConfig,
    FinetuneOptim,
    FinetuneTrain,
    Mode,
    balanced_draw,
    epoch_size,
    few_shot_pool,
    split_rows,
)
from fmct_ray.eval.metrics import auroc
from fmct_ray.models import AttentiveProbe, LinearProbe
from fmct_ray.objectives.optim import param_groups


# -- models ---------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Backbone (optional: None on cached embeddings) + head producing one logit per sample; a
    linear head reads the CLS token or the mean patch token (`features`)."""

    def __init__(
        self, head: nn.Module, mode: Mode, backbone: nn.Module | None = None, features: Features = "cls"
    ) -> None:
        super().__init__()
        self.head, self.mode, self.backbone, self.features = head, mode, backbone, features
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
            if self.mode == "attentive":
                x = feats
            else:
                x = feats["patch"].mean(1) if self.features == "patch_mean" else feats["cls"]
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


def embedding_inputs(rows: pd.DataFrame, mode: Mode, features: Features = "cls") -> Inputs:
    """Inputs from cached embeddings: CLS or mean patch vectors (linear) or all tokens (attentive)."""
    if mode == "attentive":
        if "tokens" not in rows.columns:
            raise ValueError("attentive probes on embeddings need tokens (extract with tokens: true)")
        dim = len(rows["cls"].iloc[0])
        x = torch.from_numpy(matrix(rows, "tokens", dim))
    else:
        if features not in rows.columns:
            raise ValueError(f"no {features!r} column in the embeddings (extract with patch_mean: true)")
        x = torch.from_numpy(matrix(rows, features))
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
def _volume_model(cfg: FinetuneConfig) -> tuple[Classifier, torch.device]:
    """The backbone + head classifier of the volume path, on the device it runs on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_backbone(cfg.backbone)
    head = build_head(cfg.mode, backbone.embed_dim)
    return Classifier(head, cfg.mode, backbone, cfg.features).to(device), device


def _predict_views(
    cfg: FinetuneConfig, state: dict, rows: pd.DataFrame, stores: dict[str, str]
) -> np.ndarray:
    """Scores of `rows` by the classifier of `cfg` with weights `state`, reading their views here."""
    model, device = _volume_model(cfg)
    model.load_state_dict(state)
    loader = ViewLoader(stores, cfg.view, threads=cfg.train.read_threads)
    return predict(model, volume_inputs(rows, loader, cfg.view, device), cfg.train.batch_size)


def run_finetune(
    cfg: FinetuneConfig,
    table: pd.DataFrame,
    site: str,
    stores: dict[str, str] | None = None,
    report=None,
    resume: dict | None = None,
    resources: dict[str, str] | None = None,
) -> tuple[FitResult, pd.DataFrame]:
    """Train `cfg.task` on `site` and predict the test split of every site.

    Args:
        cfg: the run.
        table: labels joined with embeddings (fast path) or labels only (volume path): scan_id,
            patient_id, site, split, task columns [, cls, tokens].
        site: training site.
        stores: site -> store URI (volume path).
        report, resume: see `fit`.
        resources: site -> custom resource of the sites pinned to their nodes: on the volume path,
            the test scans of such a site (other than `site`, whose nodes the caller runs on) are
            predicted on one of its nodes (`fmct_ray.sites.run_on_site`), the model's weights
            travelling there, its volumes never leaving.

    Returns:
        (fit result, test predictions: scan_id, patient_id, site, split, label, score).
    """
    parts = split_rows(table, cfg.task, site)
    parts["train"] = parts["train"].iloc[
        few_shot_pool(parts["train"]["label"].to_numpy(), cfg.train.shots, cfg.train.seed)
    ]
    torch.manual_seed(cfg.train.seed)
    away = parts["test"].iloc[:0]  # test scans of sites pinned elsewhere: predicted on their nodes
    if cfg.fast_path and cfg.mode != "full":
        inputs = {k: embedding_inputs(v, cfg.mode, cfg.features) for k, v in parts.items()}
        model = Classifier(build_head(cfg.mode, len(table["cls"].iloc[0])), cfg.mode, features=cfg.features)
    else:
        if not stores:
            raise ValueError("the volume path needs the site stores")
        loader = ViewLoader(stores, cfg.view, threads=cfg.train.read_threads)
        model, device = _volume_model(cfg)
        elsewhere = parts["test"]["site"].isin({s for s in (resources or {}) if s != site})
        away, parts["test"] = parts["test"][elsewhere], parts["test"][~elsewhere]
        inputs = {
            k: volume_inputs(v, loader, cfg.view, device, cfg.train.flip_prob if k == "train" else 0.0)
            for k, v in parts.items()
        }
    result = fit(model, inputs["train"], inputs["val"], cfg.optim, cfg.train, report, resume)
    result.model = model
    cols = ["scan_id", "patient_id", "site", "split", "label"]
    preds = inputs["test"].rows[cols].assign(score=predict(model, inputs["test"], cfg.train.batch_size))
    if len(away):
        from fmct_ray.sites import SiteSpec, run_on_site

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        for other, rows in away.groupby("site"):
            spec = SiteSpec(other, stores[other], resource=resources[other])
            scores = run_on_site(spec, _predict_views, cfg, state, rows, {other: stores[other]})
            preds = pd.concat([preds, rows[cols].assign(score=scores)], ignore_index=True)
    return result, preds
