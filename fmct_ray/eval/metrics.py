"""Statistics of the downstream evaluation (SPEC section 5), in plain numpy/scipy.

- `auroc`: the Mann-Whitney form (probability that a random positive outranks a random negative,
  ties counting one half), equal to the trapezoidal ROC area scikit-learn computes.
- `average_precision`: step-wise area under precision-recall, sum_n (R_n - R_{n-1}) P_n over the
  distinct score thresholds (scikit-learn's definition: no interpolation, tied scores form one step).
- `macro_auc`: the unweighted mean of per-task AUROCs (the paper's headline number).
- `bootstrap_ci`: percentile interval from resampling the held-out set *by patient* (scans of one
  patient are correlated; resampling them independently would give intervals that are too narrow);
  `bootstrap_interval` does the same for any statistic of a set of scans.
- `paired_permutation_test`: two-sided test of "model A and model B have the same AUROC" on the same
  scans: under the null the two models' scores of a scan are exchangeable, so each permutation swaps
  them at random per scan (per patient when groups are given). Scores are turned into ranks first,
  so models whose outputs live on different scales (logits, probabilities) can be swapped;
  `paired_permutation` is the same test for any metric whose predictions can be swapped per scan.
  Given several paired rows (few-shot draws: both models' probes of one draw), it tests the mean of
  the rows' differences, the quantity a few-shot table reports, swapping a scan in every row at once.
- `sign_flip_test`: two-sided paired test over repeats (few-shot draws): under the null each
  repeat's difference is as likely negative as positive. Unlike the scan-level test, which holds
  the draws fixed, it asks whether the gain would hold for other draws (5 repeats cannot go below
  p = 1/16).
- `few_shot_summary`: mean and Student-t interval over the repeats of a few-shot run (5 seeds).

Nothing here knows about Ray, devices or files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

Metric = Callable[[np.ndarray, np.ndarray], float]


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of the same length")
    if not np.isin(y, (0, 1, True, False)).all():
        raise ValueError("labels must be binary (0/1); drop missing labels before scoring")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("AUROC/AP need at least one positive and one negative")
    return y, s


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2)."""
    y, s = _check(y_true, y_score)
    return float(_auroc_rows(y, s[None])[0])


def average_precision(y_true, y_score) -> float:
    """Average precision: sum over distinct thresholds of (recall step) x precision."""
    y, s = _check(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tied group
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def macro_auc(per_task: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> float:
    """Unweighted mean AUROC over tasks given as {task: (labels, scores)}."""
    if not per_task:
        raise ValueError("macro_auc needs at least one task")
    return float(np.mean([auroc(y, s) for y, s in per_task.values()]))


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (lo, hi) interval."""

    estimate: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _group_index(groups, n: int) -> list[np.ndarray]:
    """Row indices of each group (each row its own group when `groups` is None)."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups {groups.shape} must have one entry per scan ({n})")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    groups=None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of `statistic(rows)` over `n` scans, resampling patients (or
    scans) with replacement: every scan of a drawn patient enters the resample. A resample on which
    the statistic is undefined (it raises ValueError: an AUROC without both classes) is skipped, as
    is usual; fewer than 90% defined resamples is an error."""
    estimate = statistic(np.arange(n))
    members = _group_index(groups, n)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        try:
            values.append(statistic(idx))
        except ValueError:
            continue
    if len(values) < 0.9 * n_resamples:
        raise ValueError(
            f"only {len(values)}/{n_resamples} resamples had a defined value (an AUROC needs both "
            "classes in the resample): too few scans or positives"
        )
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return Interval(float(estimate), float(lo), float(hi))


def bootstrap_ci(
    y_true,
    y_score,
    groups=None,
    metric: Metric = auroc,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of `metric` (`bootstrap_interval`).

    Args:
        y_true: binary labels, one per scan.
        y_score: model scores, one per scan.
        groups: patient id of every scan; all scans of a drawn patient enter the resample together
            (None: every scan is its own patient).
        metric: f(labels, scores) -> float.
        n_resamples: bootstrap resamples (SPEC: paper used 100; default 1000).
        level: coverage of the interval.
        seed: generator seed (same seed, same interval).
    """
    y, s = np.asarray(y_true), np.asarray(y_score, dtype=np.float64)
    return bootstrap_interval(lambda i: metric(y[i], s[i]), len(y), groups, n_resamples, level, seed)


def paired_permutation(
    difference: Callable[[np.ndarray], float],
    n: int,
    groups=None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-sided paired permutation test on `n` scans: `difference(swap)` is metric(A) - metric(B)
    after exchanging the two models' predictions of the scans where `swap` (bool, per scan) is
    true; swaps are drawn per patient (`groups`; None: per scan).

    Returns:
        (observed difference, p-value), p = (1 + #{|delta_perm| >= |delta_obs|}) / (1 + n).
    """
    observed = difference(np.zeros(n, dtype=bool))
    members = _group_index(groups, n)
    owner = np.empty(n, dtype=np.int64)
    for g, rows in enumerate(members):
        owner[rows] = g
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_permutations):
        swap = rng.random(len(members)) < 0.5
        hits += abs(difference(swap[owner])) >= abs(observed) - 1e-12
    return float(observed), (1 + hits) / (1 + n_permutations)


def paired_permutation_test(
    y_true,
    score_a,
    score_b,
    groups=None,
    metric: Metric = auroc,
    n_permutations: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-sided paired permutation test of metric(A) == metric(B) on the same scans
    (`paired_permutation`).

    Args:
        y_true: binary labels, one per scan.
        score_a: scores of model A on those scans, (n,); or (r, n): r paired rows, such as the
            probes of r few-shot draws, each scored on the same n scans.
        score_b: scores of model B, the same shape, row i paired with row i of A.
        groups: patient ids; swaps then happen per patient (None: per scan).
        metric: a rank-based metric (scores are converted to ranks, per row, before swapping).
        n_permutations: random sign flips (SPEC: 1,000).
        seed: generator seed.

    Returns:
        (mean over rows of metric(A_i) - metric(B_i), p-value). A permutation swaps a scan's two
        predictions in every row at once: the rows stay paired and the draws are held fixed.
    """
    y = np.asarray(y_true)
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape or a.shape[-1:] != y.shape or a.ndim not in (1, 2):
        raise ValueError(f"labels {y.shape}, scores A {a.shape} and B {b.shape} must match")
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    a, b = stats.rankdata(a, axis=1) / y.size, stats.rankdata(b, axis=1) / y.size
    rows = _auroc_rows if metric is auroc else lambda y, s: np.array([metric(y, r) for r in s])
    _check(y, a[0])

    def difference(swap: np.ndarray) -> float:
        return float(np.mean(rows(y, np.where(swap, b, a)) - rows(y, np.where(swap, a, b))))

    return paired_permutation(difference, len(y), groups, n_permutations, seed)


def _auroc_rows(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """`auroc` of each row of `scores` (r, n) against the same checked labels, in one ranking."""
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = stats.rankdata(scores, axis=1)  # average ranks for ties
    return (ranks[:, y].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def sign_flip_test(differences, n_permutations: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Two-sided paired test over repeats: the mean of `differences` (metric(A) - metric(B), one
    per repeat) against random sign flips of them.

    Returns:
        (mean difference, p-value), p = (1 + #{|mean(+-d)| >= |mean(d)|}) / (1 + n_permutations).
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise ValueError("sign_flip_test needs a 1-D list of finite differences")
    observed = float(d.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_permutations, len(d)))
    hits = int((np.abs(signs @ d / len(d)) >= abs(observed) - 1e-12).sum())
    return observed, (1 + hits) / (1 + n_permutations)


def few_shot_summary(values, level: float = 0.95) -> dict[str, float]:
    """Mean, standard deviation and Student-t interval of a metric over few-shot repeats."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("few_shot_summary needs a 1-D list of repeat values")
    mean = float(v.mean())
    if len(v) == 1:
        return {"mean": mean, "std": 0.0, "lo": mean, "hi": mean, "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * std / np.sqrt(len(v)))
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": len(v)}
