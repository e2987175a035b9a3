"""The pretraining study (fmct_ray/study.py): probe, draws and statistics on known answers; the
whole study on a tiny corpus through Ray (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fmct_ray.study import family, features, fewshot_draws, logistic_probe, summarise


def test_logistic_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(float)
    ours = logistic_probe(x, y, l2=1.0)(x)
    z = StandardScaler().fit_transform(x)
    ref = LogisticRegression(C=1.0).fit(z, y).decision_function(z)  # same objective: C = 1 / l2
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    w = np.array([2.0, 1, 1, 0.5, 0.5, 3])  # column weights act on the standardised features
    ours = logistic_probe(x, y, l2=1.0, weights=w)(x)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(z * w, y).decision_function(z * w)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_fewshot_draws_are_balanced_reproducible_and_labelled_only():
    y = np.array([1, 0, 1, 0, 1, 0, np.nan, 1, 0, 0])
    draws = fewshot_draws(y, 2, 3)
    assert len(draws) == 3
    for idx in draws:
        assert sorted(y[idx]) == [0, 0, 1, 1] and len(set(idx)) == 4
    assert all((a == b).all() for a, b in zip(draws, fewshot_draws(y, 2, 3), strict=True))
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError, match="K=5"):
        fewshot_draws(y, 5, 1)


def test_summarise_pools_seeds_and_tests_against_random_init():
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(60)]
    y = np.array([i % 2 for i in range(60)], float)
    labels = pd.DataFrame({"scan_id": ids, "t": y}).set_index("scan_id")
    rows = []
    for d in range(3):
        rows.append(
            {
                "task": "t",
                "backbone": "good",
                "shots": 4,
                "draw": d,
                "scan_id": ids,
                "score": list(y + 0.3 * rng.normal(size=60)),
                "auroc": 0.95,
            }
        )
        for s in range(2):
            rows.append(
                {
                    "task": "t",
                    "backbone": f"random{s}",
                    "shots": 4,
                    "draw": d,
                    "scan_id": ids,
                    "score": list(rng.normal(size=60)),
                    "auroc": 0.5,
                }
            )
    summary = summarise(pd.DataFrame(rows), labels).set_index("backbone")
    assert family("random12") == "random" and set(summary.index) == {"good", "random"}
    assert summary.loc["random", "n"] == 6  # 3 draws x 2 seeds pooled
    assert summary.loc["good", "p_vs_random"] < 0.01 and summary.loc["good", "delta_vs_random"] > 0.3
    # 3 draws, all in favour: the sign flip test over draws cannot go below 2 / 2^3
    assert summary.loc["good", "p_draws_vs_random"] == pytest.approx(0.25, abs=0.06)
    assert math.isnan(summary.loc["random"].get("p_vs_random", math.nan))


def test_grid_features_are_the_patch_tokens_in_order_without_cls():
    """`features(..., "grid")` reads the embedding job's stored tokens (CLS first, float16, flattened)."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 1 + 8, 4)).astype(np.float16)  # 3 scans, CLS + 2^3 patches, width 4
    frame = pd.DataFrame({"cls": list(tokens[:, 0]), "tokens": [t.reshape(-1) for t in tokens]})
    grid, weights = features(frame, "grid")
    assert grid.shape == (3, 8 * 4)
    np.testing.assert_array_equal(grid, tokens[:, 1:].reshape(3, -1).astype(np.float32))
    np.testing.assert_array_equal(weights, 1.0)
    frame = frame.assign(patch_mean=list(tokens[:, 1:].mean(1)))
    both, weights = features(frame, "both")
    assert both.shape == (3, 8)
    np.testing.assert_allclose(weights, 1.0)


def test_grid_and_mean_blocks_weigh_the_same_after_standardisation():
    """ "grid+mean": the 32-wide grid and the 4-wide mean token each carry half the squared norm."""
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(5, 1 + 8, 4)).astype(np.float16)
    frame = pd.DataFrame(
        {
            "cls": list(tokens[:, 0]),
            "tokens": [t.reshape(-1) for t in tokens],
            "patch_mean": list(tokens[:, 1:].astype(np.float32).mean(1)),
        }
    )
    x, weights = features(frame, "grid+mean")
    assert x.shape == (5, 32 + 4)
    np.testing.assert_array_equal(x[:, 32:], np.stack(frame["patch_mean"]))
    z = (x - x.mean(0)) / x.std(0) * weights
    np.testing.assert_allclose((z[:, :32] ** 2).sum(), (z[:, 32:] ** 2).sum(), rtol=1e-5)


@pytest.fixture(scope="module")
def dino_study(tmp_path_factory):
    """The confirmatory study of docs/models.md (pre-registered, 2026-12-06) with DINO only: the CPU
    DINO recipe at patch 4 (`cpu_dino_tiny_p4.yaml`) through Ray Data + Ray Train, probed on the
    token grid + mean token, 400 test scans, 20 draws at K = 16, on its heads (`data_seed` 21);
    about 16 minutes, once for the slow tests."""
    from fmct_ray.study import StudyConfig, run

    out = tmp_path_factory.mktemp("study")
    cfg = StudyConfig(
        objectives=("dino",),
        dino_recipe="configs/pretrain/cpu_dino_tiny_p4.yaml",
        features="grid+mean",
        shots=(16,),
        draws=20,
        test_scans=400,
        data_seed=21,
        scratch_epochs=0,
    )
    run(cfg, out, ["data", "pretrain", "embed", "probe"])
    return out


def dino_beats_random(study: Path, task: str) -> bool:
    """At K = 16: DINO's mean test AUROC above random init's, with p < 0.05 in both the paired
    permutation test on the test scans and the sign flip test over the draws."""
    labels = pd.read_parquet(study / "labels.parquet").set_index("scan_id")
    summary = summarise(pd.read_parquet(study / "probes.parquet"), labels)
    summary = summary[summary["task"] == task].set_index("backbone")
    dino, random = summary.loc["dino"], summary.loc["random"]
    return bool(dino["mean"] > random["mean"] and max(dino["p_vs_random"], dino["p_draws_vs_random"]) < 0.05)


@pytest.mark.slow
def test_cpu_dino_recipe_learns_without_collapse(dino_study):
    """Issue 11: the CPU DINO recipe's teacher moves away from its initialisation, its loss falls,
    and it collapses neither to uniform outputs nor to one prototype."""
    import torch

    from fmct_ray.models import load_backbone

    metrics = pd.read_csv(dino_study / "runs" / "study-dino" / "metrics.csv")
    log_k = metrics["log_k"].iloc[-1]
    last = metrics.tail(5)
    assert (last["teacher_entropy"] < 0.9 * log_k).all()  # not uniform
    assert (last["teacher_marginal_entropy"] > 0.3 * log_k).all()  # not one prototype
    assert metrics["dino"].tail(5).mean() < metrics["dino"].head(5).mean()
    run_dir = dino_study / "runs" / "study-dino"
    teacher = load_backbone(next(run_dir.glob("checkpoint_*/teacher_backbone.pt")))
    torch.manual_seed(0)
    init = type(teacher)(teacher.config)  # the recipe's seed 0: the teacher's initial weights
    moved = [
        float((a - b).norm() / b.norm())
        for a, b in zip(teacher.parameters(), init.parameters(), strict=True)
        if b.norm() > 0
    ]
    assert np.median(moved) > 0.05
    probes = pd.read_parquet(dino_study / "probes.parquet")
    assert set(probes["backbone"]) == {"dino", "random0", "random1", "random2"}


@pytest.mark.slow
def test_cpu_dino_beats_random_init_on_hydrocephalus(dino_study):
    """At K = 16 the DINO teacher's probe beats random init (3 seeds) on hydrocephalus."""
    assert dino_beats_random(dino_study, "hydrocephalus")


@pytest.mark.slow
def test_cpu_dino_beats_random_init_on_a_second_task(dino_study):
    """Issue 11's goal needs a second task at K = 16 with the same probe: atrophy in the docs'
    pre-registered run (p = 0.001 in both tests); the hemorrhage tasks are at chance for every
    feature at this view."""
    assert any(dino_beats_random(dino_study, t) for t in ("atrophy", "hemorrhage", "hemorrhage_left"))
