"""Metrics of the frozen-backbone tasks beyond binary classification (VoxelFM's categories), in
plain numpy/scipy; each is checked against a reference library in `tests/test_task_metrics.py`.

- `regression_metrics`: MAE in target units and z-scored, R^2, Pearson r.
- `c_index`: Harrell's concordance of a risk score with censored survival times (scikit-survival's
  definition: a pair is comparable when the earlier time is an event, or when the times tie and
  only one of them is an event; tied risks count one half).
- `censoring_survival` / `time_dependent_auroc`: the cumulative/dynamic AUROC at a horizon
  (cases: an event by the horizon; controls: still at risk after it), with cases weighted by the
  inverse probability of being uncensored (Uno et al. 2007), the censoring distribution estimated
  by Kaplan-Meier on the training split.
- `recall_at_k`: retrieval without training (VoxelFM; `retrieval_ranks` per query): for each
  label, each positive query ranks one other positive among it and `n_negatives` negatives by
  cosine similarity; Recall@k is the fraction of queries whose positive is in the top k,
  macro-averaged over labels. Chance is k / (1 + n_negatives).
- `localisation_error`: Euclidean distance between predicted and true points (mm).
- `dice_scores`: Dice per class, and micro and macro over the classes, background excluded
  (`dice_counts` per scan add up; `dice_from_counts` scores any set of scans).

Nothing here knows about Ray, devices or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def _vectors(*arrays, names: Sequence[str]) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(out[0])
    for a, name in zip(out, names):
        if a.ndim != 1 or len(a) != n:
            raise ValueError(f"{name} must be 1-D with {n} entries, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite (drop missing targets before scoring)")
    return out


def regression_metrics(y_true, y_pred, scale: float = 1.0) -> dict[str, float]:
    """MAE (target units, and divided by `scale`: the training target's standard deviation),
    R^2 (1 - SS_res / SS_tot) and Pearson r of predictions against targets."""
    y, p = _vectors(y_true, y_pred, names=("targets", "predictions"))
    if len(y) < 2 or np.ptp(y) == 0:
        raise ValueError("regression metrics need at least two different targets")
    mae = float(np.abs(p - y).mean())
    r2 = 1.0 - float(((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    r = float(stats.pearsonr(y, p)[0]) if np.ptp(p) > 0 else 0.0
    return {"mae": mae, "mae_z": mae / scale, "r2": r2, "pearson_r": r}


def _survival(time, event, *risk) -> list[np.ndarray]:
    t, e, *r = _vectors(time, event, *risk, names=("times", "events", "risk scores"))
    if not np.isin(e, (0, 1)).all():
        raise ValueError("events must be 0 (censored) or 1 (event)")
    return [t, e.astype(bool), *r]


def c_index(time, event, risk) -> float:
    """Harrell's C: P(higher risk | earlier event) over comparable pairs."""
    t, e, r = _survival(time, event, risk)
    concordant = comparable = 0.0
    for i in np.flatnonzero(e):
        others = (t > t[i]) | ((t == t[i]) & ~e)
        comparable += others.sum()
        concordant += (r[i] > r[others]).sum() + 0.5 * (r[i] == r[others]).sum()
    if comparable == 0:
        raise ValueError("no comparable pair: the C-index needs an event before another time")
    return float(concordant / comparable)


def kaplan_meier(time, event):
    """Kaplan-Meier estimate of S(t) = P(T > t) from censored (time, event); returns S as a step
    function (right-continuous; at a tie the at-risk set includes every tied time)."""
    t, e = _survival(time, event)
    times = np.unique(t)
    at_risk = (t[None, :] >= times[:, None]).sum(1)
    events = ((t[None, :] == times[:, None]) & e[None, :]).sum(1)
    s = np.cumprod(1.0 - events / at_risk)

    def survival(x) -> np.ndarray:
        idx = np.searchsorted(times, np.asarray(x, dtype=np.float64), side="right") - 1
        return np.where(idx >= 0, s[np.clip(idx, 0, None)], 1.0)

    return survival


def censoring_survival(time, event):
    """Kaplan-Meier estimate of the censoring distribution G(t) = P(C > t) from (time, event)
    (censoring is the 'event'; at a tie, events happen first). Returns G as a step function."""
    return kaplan_meier(time, 1 - np.asarray(event, dtype=np.float64))


def time_dependent_auroc(time, event, risk, horizon: float, train_time=None, train_event=None) -> float:
    """Cumulative/dynamic AUROC at `horizon`: cases (event at or before it) against controls (time
    after it), cases weighted by 1 / G(t_i), G the censoring survival estimated on the training
    split (`train_time`, `train_event`; the test split itself when not given)."""
    t, e, r = _survival(time, event, risk)
    g = censoring_survival(t if train_time is None else train_time, e if train_event is None else train_event)
    cases, controls = (t <= horizon) & e, t > horizon
    if not cases.any() or not controls.any():
        raise ValueError(f"the horizon {horizon} leaves no case or no control")
    weights = 1.0 / g(t[cases])
    rc, rn = r[cases][:, None], r[controls][None, :]
    wins = (rc > rn).sum(1) + 0.5 * (rc == rn).sum(1)
    return float((weights * wins).sum() / (weights.sum() * controls.sum()))


def retrieval_ranks(
    embeddings, y, n_negatives: int = 99, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Retrieval by cosine similarity for one binary label `y` (NaN: unlabelled): each positive
    query gets one other positive and `n_negatives` negatives drawn at random (all negatives
    when fewer); returns (query rows, the positive's rank among the candidates (0 = first; ties
    count one half), candidates per query). The draws depend on `y` and `seed` only, so two
    models' embeddings of the same scans are ranked against the same candidates."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (len(x),):
        raise ValueError(f"label has {y.shape} values for {len(x)} embeddings")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) < 2 or len(neg) == 0:
        raise ValueError("retrieval needs two positives and a negative")
    m = min(n_negatives, len(neg))
    ranks = []
    for q in pos:
        other = rng.choice(pos[pos != q])
        candidates = np.r_[other, rng.choice(neg, m, replace=False)]
        sims = x[candidates] @ x[q]
        ranks.append(float((sims[1:] > sims[0]).sum() + 0.5 * (sims[1:] == sims[0]).sum()))
    return pos, np.asarray(ranks), m + 1


def recall_at_k(
    embeddings,
    labels: Mapping[str, np.ndarray],
    ks: Sequence[int] = (1, 5, 10),
    n_negatives: int = 99,
    seed: int = 0,
) -> dict[str, float]:
    """Retrieval by cosine similarity of `embeddings` (n, d), macro over the binary `labels`
    ({name: 0/1 per row; NaN: unlabelled, left out}), ranked by `retrieval_ranks` (labels
    without two positives and a negative are left out). Returns {"recall@k": ..., "chance@k": ...}
    (chance: k / candidates, averaged like the recalls) and "n_labels"."""
    recalls = {k: [] for k in ks}
    chances = {k: [] for k in ks}
    for y in labels.values():
        try:
            _, ranks, candidates = retrieval_ranks(embeddings, y, n_negatives, seed)
        except ValueError as err:
            if "two positives" not in str(err):
                raise
            continue  # no pair to retrieve
        for k in ks:
            recalls[k].append(float((ranks < k).mean()))
            chances[k].append(min(k, candidates) / candidates)
    if not recalls[ks[0]]:
        raise ValueError("no label has two positives and a negative to retrieve")
    out: dict[str, float] = {"n_labels": float(len(recalls[ks[0]]))}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(recalls[k]))
        out[f"chance@{k}"] = float(np.mean(chances[k]))
    return out


def localisation_error(pred, true) -> np.ndarray:
    """Per-sample Euclidean distance between predicted and true points (n, 3), in their units."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"points must be (n, dims) of one shape, got {p.shape} and {t.shape}")
    return np.linalg.norm(p - t, axis=1)


def dice_counts(pred, target, n_classes: int) -> np.ndarray:
    """(C-1, 2) voxel counts of integer label volumes (any shape; 0 = background): per class
    1..C-1, the intersection and the sum of both volumes' sizes. Counts add over scans."""
    p, t = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction {np.shape(pred)} and target {np.shape(target)} differ")
    return np.array(
        [
            [int(((p == c) & (t == c)).sum()), int((p == c).sum() + (t == c).sum())]
            for c in range(1, n_classes)
        ]
    )


def dice_from_counts(counts) -> dict[str, float]:
    """Dice per class ("dice_<c>", NaN when the class is in neither volume), micro (pooled over
    classes 1..C-1) and macro (mean of the per-class values that exist) from `dice_counts`."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 2)
    out: dict[str, float] = {
        f"dice_{c}": 2 * i / s if s else float("nan") for c, (i, s) in enumerate(counts, start=1)
    }
    per_class = [v for v in out.values() if not np.isnan(v)]
    inter, total = counts.sum(0)
    out["dice_micro"] = 2 * inter / total if total else float("nan")
    out["dice_macro"] = float(np.mean(per_class)) if per_class else float("nan")
    return out


def dice_scores(pred, target, n_classes: int) -> dict[str, float]:
    """Dice of integer label volumes pooled over every voxel given (`dice_from_counts`)."""
    return dice_from_counts(dice_counts(pred, target, n_classes))
