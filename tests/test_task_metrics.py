"""The metrics of issue 12's task categories against reference libraries (scikit-learn,
scikit-survival, scipy) and cases with known answers."""

import numpy as np
import pytest

from fmct_ray.eval.task_metrics import (
    c_index,
    censoring_survival,
    dice_scores,
    localisation_error,
    recall_at_k,
    regression_metrics,
    time_dependent_auroc,
)


def survival_data(n: int, seed: int):
    """Continuous (tie-free) times, an informative risk, about 30% censored."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    event_time = rng.exponential(np.exp(-risk))
    censor_time = rng.exponential(2.0, size=n)
    return np.minimum(event_time, censor_time), event_time <= censor_time, risk + rng.normal(0, 0.5, n)


def test_regression_metrics_match_scikit_learn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, r2_score

    rng = np.random.default_rng(0)
    y = rng.normal(10, 3, 200)
    p = y + rng.normal(0, 1.5, 200)
    m = regression_metrics(y, p, scale=3.0)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["mae_z"] == pytest.approx(mean_absolute_error(y, p) / 3.0)
    assert m["r2"] == pytest.approx(r2_score(y, p))
    assert m["pearson_r"] == pytest.approx(pearsonr(y, p)[0])
    perfect = regression_metrics(y, y)
    assert (perfect["mae"], perfect["r2"], perfect["pearson_r"]) == (0.0, 1.0, pytest.approx(1.0))
    assert regression_metrics(y, np.full_like(y, y.mean()))["r2"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="finite"):
        regression_metrics(y, np.r_[p[:-1], np.nan])


def test_c_index_matches_scikit_survival_with_ties():
    from sksurv.metrics import concordance_index_censored

    t, e, r = survival_data(150, 1)
    t, r = np.round(t, 1), np.round(r, 1)  # ties in time and in risk
    ours = c_index(t, e, r)
    ref = concordance_index_censored(e, t, r)[0]
    assert ours == pytest.approx(ref, abs=1e-12)
    # known answers: risk ordered exactly against time is 1, reversed 0, constant 1/2
    t = np.arange(1.0, 6.0)
    e = np.ones(5, dtype=bool)
    assert c_index(t, e, -t) == 1.0 and c_index(t, e, t) == 0.0 and c_index(t, e, np.zeros(5)) == 0.5


def test_censoring_survival_is_kaplan_meier_of_the_censoring():
    from sksurv.nonparametric import kaplan_meier_estimator

    t, e, _ = survival_data(80, 2)
    times, g = kaplan_meier_estimator(~e, t)  # censoring as the event (no ties: conventions agree)
    np.testing.assert_allclose(censoring_survival(t, e)(times), g)
    assert censoring_survival(t, e)(-1.0) == 1.0


def test_time_dependent_auroc_matches_scikit_survival():
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    t_train, e_train, _ = survival_data(300, 3)
    t, e, r = survival_data(120, 4)
    horizon = float(np.quantile(t[e], 0.5))
    ours = time_dependent_auroc(t, e, r, horizon, t_train, e_train)
    train, test = Surv.from_arrays(e_train, t_train), Surv.from_arrays(e, t)
    ref = cumulative_dynamic_auc(train, test, r, [horizon])[0][0]
    assert ours == pytest.approx(ref, abs=1e-9)
    perfect = np.where((t <= horizon) & e, 1.0, 0.0)  # every case above every control
    assert time_dependent_auroc(t, e, perfect, horizon, t_train, e_train) == pytest.approx(1.0)
    assert time_dependent_auroc(t, e, np.zeros_like(r), horizon) == pytest.approx(0.5)


def test_recall_at_k_known_answers():
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random(n) < 0.2).astype(float)
    separable = np.c_[y, 1 - y] + rng.normal(0, 0.01, (n, 2))  # positives all point one way
    m = recall_at_k(separable, {"finding": y})
    assert m["recall@1"] == m["recall@5"] == 1.0
    assert m["chance@1"] == pytest.approx(0.01) and m["chance@10"] == pytest.approx(0.1)
    noise = rng.normal(size=(n, 16))
    r = recall_at_k(noise, {"a": y, "b": (rng.random(n) < 0.3).astype(float)})
    assert r["n_labels"] == 2
    for k in (1, 5, 10):  # a random embedding retrieves at chance (about 80 and 120 queries)
        assert abs(r[f"recall@{k}"] - r[f"chance@{k}"]) < 0.08
    few = np.r_[np.ones(3), np.zeros(9), np.full(4, np.nan)]  # 9 negatives: 10 candidates per query
    assert recall_at_k(noise[:16], {"a": few})["chance@5"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two positives"):
        recall_at_k(noise[:5], {"a": np.r_[1.0, 0, 0, 0, 0]})


def test_localisation_error_is_euclidean():
    pred = np.array([[0.0, 0, 0], [1, 2, 2]])
    np.testing.assert_allclose(localisation_error(pred, np.zeros((2, 3))), [0.0, 3.0])


def test_dice_matches_scikit_learn_f1_and_known_cases():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(6)
    target = rng.integers(0, 3, size=(8, 8, 8))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 3, size=target.shape))
    d = dice_scores(pred, target, 3)
    t, p = target.ravel(), pred.ravel()
    np.testing.assert_allclose([d["dice_1"], d["dice_2"]], f1_score(t, p, labels=[1, 2], average=None))
    assert d["dice_micro"] == pytest.approx(f1_score(t, p, labels=[1, 2], average="micro"))
    assert d["dice_macro"] == pytest.approx(f1_score(t, p, labels=[1, 2], average="macro"))
    box = np.zeros((4, 4, 4), dtype=int)
    box[:2] = 1
    half = np.zeros_like(box)
    half[:1] = 1
    assert dice_scores(half, box, 2)["dice_1"] == pytest.approx(2 * 16 / (16 + 32))
    absent = dice_scores(box, box, 3)
    assert absent["dice_1"] == 1.0 and np.isnan(absent["dice_2"]) and absent["dice_macro"] == 1.0
