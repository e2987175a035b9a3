"""Toy SSL training on synthetic volumes: losses fall and DINO does not collapse.

The training loops live in `bench/ssl_curves.py` (which also draws the curves in docs/models.md);
this file imports them by path. Default tier: a 60-step MAE run (about 10 s on 2 cores). Slow
tier: 300 steps of DINO (+ iBOT + KoLeo) and MAE, the runs recorded in docs/models.md.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "ssl_curves.py"
_SPEC = importlib.util.spec_from_file_location("ssl_curves", _PATH)
ssl_curves = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ssl_curves)


def _mean(values, lo, hi=None):
    return statistics.fmean(values[lo:hi])


def test_mae_loss_falls_quickly():
    torch.set_num_threads(2)
    log = ssl_curves.train_mae(60, batch=4)
    assert all(math.isfinite(v) for v in log["loss"])
    assert _mean(log["loss"], -10) < 0.5 * _mean(log["loss"], 0, 10)
    assert log["embed_std"][-1] > 1e-2  # encoder CLS still varies across volumes


@pytest.mark.slow
def test_dino_trains_without_collapse():
    torch.set_num_threads(2)
    log = ssl_curves.train_dino(300)
    log_k = log["log_k"]
    # the loss goes on falling after the first 50 steps
    assert _mean(log["loss"], -30) < _mean(log["loss"], 20, 50) - 1.0
    entropy, marginal = _mean(log["entropy"], -30), _mean(log["marginal_entropy"], -30)
    assert 1.0 < entropy < log_k - 0.5  # neither one-hot nor uniform teacher outputs
    assert marginal - entropy > 0.2  # different volumes use different prototypes
    assert _mean(log["embed_std"], -30) > 2 * _mean(log["embed_std"], 0, 30)  # embeddings spread


@pytest.mark.slow
def test_mae_trains_300_steps():
    torch.set_num_threads(2)
    log = ssl_curves.train_mae(300)
    # most of the fall comes in the first ~15 steps (the mean intensity); the rest must go on falling
    assert _mean(log["loss"], -20) < 0.25 * _mean(log["loss"], 0, 5)
    assert _mean(log["loss"], -20) < 0.8 * _mean(log["loss"], 20, 40)
    assert _mean(log["embed_std"], -20) > 1e-2
