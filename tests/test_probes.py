"""Issue 12's probes (fmct_ray.downstream.probes): the Cox loss against scikit-survival's Breslow
fit, and each probe learning a feature-level task whose answer is known."""

import numpy as np
import pytest
import torch

from fmct_ray.downstream.probes import (
    ProbeConfig,
    cox_loss,
    knn_probe,
    mask_probe,
    mlp_probe,
    point_probe,
)
from fmct_ray.eval.metrics import auroc
from fmct_ray.eval.task_metrics import c_index, dice_scores, localisation_error, regression_metrics

FAST = ProbeConfig(hidden=64, epochs=30)


def test_cox_loss_minimum_is_the_breslow_fit_of_scikit_survival():
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    time = np.ceil(rng.exponential(np.exp(-(x @ [1.0, -0.5, 0.0]))) * 4)  # integer times: ties
    event = rng.random(120) < 0.7
    ref = CoxPHSurvivalAnalysis(ties="breslow", alpha=0).fit(x, Surv.from_arrays(event, time)).coef_
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    xt, tt, et = (torch.as_tensor(a) for a in (x, time, event))
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_loss(xt @ beta, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), ref, atol=1e-4)
    # known answer: one event with everyone at risk and equal risks: log n
    assert float(cox_loss(torch.zeros(4), torch.tensor([1.0, 2, 3, 4]), torch.tensor([1, 0, 0, 0]))) == (
        pytest.approx(np.log(4))
    )


def features(n: int, seed: int, d: int = 16):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_mlp_probe_learns_binary_continuous_and_survival_targets():
    x, xv, xt = features(300, 1), features(100, 2), features(200, 3)
    binary = lambda a: (a[:, 0] + a[:, 1] > 0).astype(float)  # noqa: E731
    score = mlp_probe("binary", x, binary(x), xv, binary(xv), FAST)
    assert auroc(binary(xt), score(xt)) > 0.95
    torch.rand(7)  # the same seed gives the same probe, whatever drew from torch's generator before
    np.testing.assert_array_equal(mlp_probe("binary", x, binary(x), xv, binary(xv), FAST)(xt), score(xt))
    value = lambda a: 40 + 10 * a[:, 0] - 5 * a[:, 2]  # noqa: E731  target units (say, mL)
    pred = mlp_probe("continuous", x, value(x), xv, value(xv), FAST)(xt)
    m = regression_metrics(value(xt), pred, scale=value(x).std())
    assert m["r2"] > 0.8 and m["pearson_r"] > 0.9 and m["mae"] < 5

    def survival(a, seed):
        rng = np.random.default_rng(seed)
        t = rng.exponential(np.exp(-1.5 * a[:, 0]))
        c = rng.exponential(2.0, len(a))
        return np.c_[np.minimum(t, c), t <= c]

    s, sv, st = survival(x, 4), survival(xv, 5), survival(xt, 6)
    risk = mlp_probe("survival", x, s, xv, sv, FAST)(xt)
    assert c_index(st[:, 0], st[:, 1], risk) > 0.7
    with pytest.raises(ValueError, match="not 'mask'"):
        mlp_probe("mask", x, binary(x), xv, binary(xv), FAST)


def test_knn_probe_picks_k_on_validation():
    x, xv, xt = features(200, 7, 8), features(100, 8, 8), features(100, 9, 8)
    label = lambda a: (a[:, 0] > 0).astype(float)  # noqa: E731
    k, score = knn_probe(x, label(x), xv, label(xv))
    assert 1 <= k <= 101 and k % 2 == 1
    assert auroc(label(xt), score(xt)) > 0.9
    k1, _ = knn_probe(x[:5], label(x[:5]), xv, label(xv))
    assert k1 <= 5


def grid_positions(g: int, patch_mm: float) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return (idx + 0.5) * patch_mm


def test_point_probe_finds_the_marked_patch():
    """Tokens are noise but for one patch that carries a marker direction: its centre is the
    point. The regressor must find it to within a patch (8 mm) on unseen scans."""
    g, d, mm = 4, 16, 8.0
    pos = grid_positions(g, mm)
    marker = np.random.default_rng(10).normal(size=d).astype(np.float32) * 3

    def scans(n, seed):
        rng = np.random.default_rng(seed)
        tokens = rng.normal(size=(n, g**3, d)).astype(np.float32)
        where = rng.integers(0, g**3, n)
        tokens[np.arange(n), where] += marker
        return tokens, pos[where]

    (x, y), (xv, yv), (xt, yt) = scans(300, 11), scans(60, 12), scans(60, 13)
    predict = point_probe(x, y, xv, yv, pos, ProbeConfig(epochs=30, lr=3e-3))
    err = localisation_error(predict(xt), yt)
    chance = localisation_error(np.repeat(pos.mean(0, keepdims=True), len(yt), 0), yt).mean()
    assert err.mean() < 8.0 < chance


def test_mask_probe_segments_a_label_carried_by_the_tokens():
    """Each patch token says whether its 4^3 block is foreground; the head must upsample that to
    the 16^3 volume."""
    g, d = 4, 8
    direction = np.random.default_rng(14).normal(size=d).astype(np.float32)

    def scans(n, seed):
        rng = np.random.default_rng(seed)
        blocks = rng.random((n, g, g, g)) < 0.3
        tokens = rng.normal(0, 0.3, (n, g**3, d)).astype(np.float32)
        tokens += blocks.reshape(n, -1, 1) * direction
        masks = blocks.repeat(4, 1).repeat(4, 2).repeat(4, 3).astype(np.int64)
        return tokens, masks

    (x, y), (xv, yv), (xt, yt) = scans(64, 15), scans(16, 16), scans(16, 17)
    predict = mask_probe(x, y, xv, yv, (g, g, g), 2, ProbeConfig(epochs=15, lr=3e-3, batch_size=8))
    assert dice_scores(predict(xt), yt, 2)["dice_1"] > 0.8


def test_segmentation_loss_known_answers():
    from fmct_ray.downstream.probes import segmentation_loss

    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 40
    assert float(segmentation_loss(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    background = torch.zeros(2, 3, 4, 4, 4)
    background[:, 0] = 40  # everything called background: the Dice term is 1 for the one class present
    loss = segmentation_loss(background, target)
    ce = torch.nn.functional.cross_entropy(background, target)
    assert float(loss - ce) == pytest.approx(1.0, abs=1e-6)
