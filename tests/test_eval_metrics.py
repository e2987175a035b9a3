"""Downstream statistics against scikit-learn and against cases with known answers."""

import itertools

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from fmct_ray.eval import metrics as M


def random_case(seed, n=200, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    y[:2] = [True, False]
    s = rng.normal(size=n) + 1.2 * y
    return y.astype(int), (np.round(s, 1) if ties else s)


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True), (3, False)])
def test_auroc_and_ap_match_sklearn(seed, ties):
    y, s = random_case(seed, ties=ties)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_known_answers():
    assert M.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert M.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs (pos, neg): (0.8 > 0.3), (0.8 > 0.6), (0.4 > 0.3), (0.4 < 0.6) -> 3/4
    assert M.auroc([1, 0, 1, 0], [0.8, 0.3, 0.4, 0.6]) == 0.75
    # ranking 0.8(+) 0.6(-) 0.4(+) 0.3(-): precision 1 at recall 1/2, 2/3 at recall 1 -> 5/6
    assert M.average_precision([1, 0, 1, 0], [0.8, 0.3, 0.4, 0.6]) == pytest.approx(5 / 6)
    assert M.average_precision([1, 1, 0], [0.9, 0.9, 0.9]) == pytest.approx(2 / 3)


def test_macro_auc_is_mean_of_tasks():
    cases = {f"t{i}": random_case(i) for i in range(3)}
    expected = np.mean([roc_auc_score(y, s) for y, s in cases.values()])
    assert M.macro_auc(cases) == pytest.approx(expected)


@pytest.mark.parametrize(
    "y, s, match",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "one positive and one negative"),
        ([0, 2], [0.1, 0.2], "binary"),
        ([0, 1], [0.1, np.nan], "finite"),
        ([0, 1], [0.1], "same length"),
    ],
)
def test_bad_input_raises(y, s, match):
    with pytest.raises(ValueError, match=match):
        M.auroc(y, s)


def test_bootstrap_ci_brackets_estimate_and_is_reproducible():
    y, s = random_case(4, n=300)
    ci = M.bootstrap_ci(y, s, n_resamples=300, seed=1)
    assert ci.estimate == pytest.approx(roc_auc_score(y, s))
    assert ci.lo < ci.estimate < ci.hi and ci.hi - ci.lo < 0.2
    assert M.bootstrap_ci(y, s, n_resamples=300, seed=1) == ci
    # a perfect classifier has a degenerate interval at 1
    perfect = M.bootstrap_ci([0, 0, 1, 1] * 10, [0, 0, 1, 1] * 10, n_resamples=100)
    assert (perfect.lo, perfect.hi) == (1.0, 1.0)


def test_bootstrap_resamples_whole_patients():
    """Ten copies of each scan under one patient: resampling by patient must give the interval of
    the de-duplicated set (one scan per patient), resampling by scan a far narrower one."""
    y, s = random_case(5, n=40)
    rep_y, rep_s, patients = np.repeat(y, 10), np.repeat(s, 10), np.repeat(np.arange(40), 10)
    by_patient = M.bootstrap_ci(rep_y, rep_s, groups=patients, n_resamples=400, seed=3)
    dedup = M.bootstrap_ci(y, s, n_resamples=400, seed=3)
    by_scan = M.bootstrap_ci(rep_y, rep_s, n_resamples=400, seed=3)
    assert by_patient == dedup  # identical draws: patient g <-> scan g, metric unchanged by copies
    assert (by_scan.hi - by_scan.lo) < 0.6 * (by_patient.hi - by_patient.lo)


def test_bootstrap_refuses_too_few_positives():
    with pytest.raises(ValueError, match="both classes"):
        M.bootstrap_ci([1] + [0] * 99, np.arange(100), n_resamples=50)


def exact_permutation_p(y, a, b):
    """All 2^n swap patterns (the exact null distribution)."""
    a, b = M.stats.rankdata(a) / len(a), M.stats.rankdata(b) / len(b)
    obs = abs(M.auroc(y, a) - M.auroc(y, b))
    hits = []
    for swap in itertools.product([False, True], repeat=len(y)):
        swap = np.array(swap)
        hits.append(abs(M.auroc(y, np.where(swap, b, a)) - M.auroc(y, np.where(swap, a, b))) >= obs - 1e-12)
    return np.mean(hits)


def test_permutation_test_matches_exact_enumeration():
    rng = np.random.default_rng(0)
    y = np.array([1, 0] * 6)
    a = y + rng.normal(0, 0.6, 12)
    b = rng.normal(0, 1, 12)
    exact = exact_permutation_p(y, a, b)  # 4096 patterns
    delta, p = M.paired_permutation_test(y, a, b, n_permutations=4000, seed=1)
    assert delta == pytest.approx(M.auroc(y, a) - M.auroc(y, b))
    assert p == pytest.approx(exact, abs=0.025)


def test_permutation_test_extremes():
    y, s = random_case(6, n=200)
    assert M.paired_permutation_test(y, s, 3 * s + 1, n_permutations=200)[1] == 1.0  # same ranking
    noise = np.random.default_rng(1).normal(size=200)
    delta, p = M.paired_permutation_test(y, y + 0.1 * noise, noise, n_permutations=1000)
    assert delta > 0.4 and p == pytest.approx(1 / 1001)


def test_permutation_by_patient_swaps_whole_patients():
    y, s = random_case(7, n=30)
    noise = np.random.default_rng(2).normal(size=30)
    rep = lambda v: np.repeat(v, 3)  # noqa: E731
    grouped = M.paired_permutation_test(
        rep(y), rep(s), rep(noise), groups=np.repeat(np.arange(30), 3), n_permutations=300, seed=4
    )
    plain = M.paired_permutation_test(y, s, noise, n_permutations=300, seed=4)
    assert grouped == pytest.approx(plain)


def test_permutation_test_of_paired_rows_tests_their_mean_difference():
    """Few-shot draws: row i of A is paired with row i of B; the statistic is the mean of the rows'
    AUROC differences, and a scan is swapped in every row at once."""
    y, s = random_case(8, n=200)
    rng = np.random.default_rng(3)
    a = s + rng.normal(0, 1.0, (4, 200))  # 4 draws of a better model
    b = rng.normal(0, 1.0, (4, 200))  # and of one that sees nothing
    delta, p = M.paired_permutation_test(y, a, b, n_permutations=300, seed=5)
    assert delta == pytest.approx(np.mean([M.auroc(y, ai) - M.auroc(y, bi) for ai, bi in zip(a, b)]))
    assert p < 0.01
    # one row is the 1-D test; copies of one row swap together, so they change nothing
    one = M.paired_permutation_test(y, a[0], b[0], n_permutations=300, seed=5)
    assert M.paired_permutation_test(y, a[:1], b[:1], n_permutations=300, seed=5) == pytest.approx(one)
    copies = M.paired_permutation_test(y, a[[0, 0, 0]], b[[0, 0, 0]], n_permutations=300, seed=5)
    assert copies == pytest.approx(one)
    # any metric, row by row
    ap = M.paired_permutation_test(y, a, b, metric=M.average_precision, n_permutations=50, seed=5)
    ranks = lambda v: M.stats.rankdata(v, axis=1) / 200  # noqa: E731
    rows = [M.average_precision(y, ai) - M.average_precision(y, bi) for ai, bi in zip(ranks(a), ranks(b))]
    assert ap[0] == pytest.approx(np.mean(rows))
    with pytest.raises(ValueError, match="must match"):
        M.paired_permutation_test(y, a, b[:3])


def test_sign_flip_test_matches_exact_enumeration():
    d = np.array([0.04, 0.01, -0.02, 0.05, 0.03, 0.00, 0.02, -0.01])
    patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=len(d))))
    exact = np.mean(np.abs(patterns @ d) >= abs(d.sum()) - 1e-12)
    mean, p = M.sign_flip_test(d, n_permutations=4000, seed=2)
    assert mean == pytest.approx(d.mean()) and p == pytest.approx(exact, abs=0.02)
    assert M.sign_flip_test([0.1] * 5, n_permutations=4000)[1] == pytest.approx(1 / 16, abs=0.015)
    assert M.sign_flip_test([0.1, -0.1] * 4)[1] == 1.0
    with pytest.raises(ValueError):
        M.sign_flip_test([])


def test_few_shot_summary():
    out = M.few_shot_summary([0.7, 0.8, 0.9, 0.8, 0.8])
    assert out["mean"] == pytest.approx(0.8) and out["n"] == 5
    half = 2.7764451051977987 * np.std([0.7, 0.8, 0.9, 0.8, 0.8], ddof=1) / np.sqrt(5)  # t(0.975, 4)
    assert (out["lo"], out["hi"]) == pytest.approx((0.8 - half, 0.8 + half))
    assert M.few_shot_summary([0.6])["lo"] == 0.6


def test_report_tables_survive_a_test_split_too_small_for_an_interval():
    """One small site must not stop the report: a split with one positive gets its AUROC without
    an interval, a split with one class gets none, and the other rows keep theirs (a docstring
    example's report stopped here with 'only 898/1000 resamples had a defined value')."""
    from fmct_ray.eval.report import ReportConfig, fewshot_table, results_table

    rng = np.random.default_rng(0)
    rows = []
    for site, labels in (("big", [0, 1] * 20), ("one_pos", [1] + [0] * 9), ("one_class", [0] * 10)):
        for mode in ("linear", "scratch"):
            for i, y in enumerate(labels):
                run = {
                    "task": "T",
                    "train_site": site,
                    "eval_site": site,
                    "mode": mode,
                    "shots": 0,
                    "seed": 0,
                }
                rows.append(
                    {
                        **run,
                        "scan_id": f"{site}{i}",
                        "patient_id": f"{site}{i}",
                        "label": y,
                        "score": y + rng.normal(),
                    }
                )
    table = results_table(pd.DataFrame(rows), ReportConfig(200, 200)).set_index(["site", "mode"])
    big, one = table.loc[("big", "linear")], table.loc[("one_pos", "linear")]
    assert big["auroc_lo"] < big["auroc"] < big["auroc_hi"] and big["p_vs_scratch"] < 1
    assert 0 <= one["auroc"] <= 1 and np.isnan(one["auroc_lo"]) and "too few positives" in one["auroc_ci"]
    assert np.isnan(table.loc[("one_class", "linear"), "auroc"])
    assert table.loc[("one_class", "linear"), "auroc_ci"] == "one class: no AUROC"
    few = fewshot_table(pd.DataFrame(rows))
    assert set(few["site"]) == {"big", "one_pos"}  # a one-class split has no AUROC to average
