"""What a downstream run is and which scans it sees (SPEC section 3): the recipe dataclasses of
`configs/finetune/*.yaml` (`FinetuneConfig` with its optimiser, training length and sweep matrix),
the class-balanced epoch draws and few-shot pools, and the label-table splits of one task and site.

The training loop that consumes these lives in `fmct_ray.downstream.finetune`; the Tune fan-out in
`fmct_ray.downstream.tune`. No training code and no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from fmct_ray.data.embed import BackboneConfig
from fmct_ray.data.views import ViewConfig

Mode = Literal["full", "linear", "attentive"]
Features = Literal["cls", "patch_mean"]


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


# -- the recipe -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """The runs a sweep fans out (`fmct_ray.downstream.tune`; SPEC section 3).

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
        features: the embedding the linear head reads in linear and full modes: the CLS token
            (SPEC), or the mean of the patch tokens (`patch_mean`; on a backbone that never saw
            labels, e.g. a random-init one in the CPU tests, it keeps more of the image).
        sweep: the matrix of runs and the scratch grid (`fmct_ray.downstream.tune`).
    """

    task: str = "Hydrocephalus"
    mode: Mode = "linear"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    fast_path: bool = True
    features: Features = "cls"
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
