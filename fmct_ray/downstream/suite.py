"""The frozen-backbone probe suite on cached embeddings (issue 12): one call = one task of one
category, probed on a training pool, selected on validation, scored on a test split.

Inputs are what the embedding job stores (`fmct_ray.data.embed`: `cls`, `patch_mean`, and with
`tokens: true` the CLS + patch tokens, registers excluded) joined with the label table's typed
targets, and for masks the store's label volumes cut to the evaluation view the backbone saw.
Points and localisation errors are in the stored frame (voxel index x 1 mm); patch positions are
mapped there from the view (`patch_positions`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from fmct_ray.data.embed import matrix
from fmct_ray.data.views import ViewConfig
from fmct_ray.downstream.probes import Kind, ProbeConfig, knn_probe, mask_probe, mlp_probe, point_probe
from fmct_ray.eval.metrics import auroc, average_precision
from fmct_ray.eval.task_metrics import (
    c_index,
    dice_counts,
    dice_scores,
    localisation_error,
    recall_at_k,
    regression_metrics,
    retrieval_ranks,
    time_dependent_auroc,
)

Probe = Literal["mlp", "knn", "attention", "segmentation", "retrieval"]
PROBES: dict[Kind, tuple[Probe, ...]] = {
    "binary": ("mlp", "knn", "retrieval"),
    "continuous": ("mlp",),
    "survival": ("mlp",),
    "point": ("attention",),
    "mask": ("segmentation",),
}


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task and where its target is.

    Args:
        name: task name (reports).
        kind: binary, continuous, survival, point or mask.
        columns: label-table columns of the target: one (binary, continuous), (time, event)
            (survival), (x, y, z) in stored mm (point); for a mask, the store's mask name.
        n_classes: label values of a mask (0 = background).
        horizon: time of the survival task's time-dependent AUROC (None: the median event time).
    """

    name: str
    kind: Kind
    columns: tuple[str, ...]
    n_classes: int = 2
    horizon: float | None = None


def view_labels(mask: np.ndarray, view: ViewConfig) -> np.ndarray:
    """A stored label volume cut as the evaluation view is (the centre `crop`^3, `size`^3 samples),
    by nearest neighbour: the voxel at each view voxel's centre."""
    start = [(n - view.crop) // 2 for n in mask.shape]
    idx = [s + ((np.arange(view.size) + 0.5) * view.crop / view.size).astype(int) for s in start]
    return mask[np.ix_(*idx)]


def patch_positions(grid: tuple[int, int, int], view: ViewConfig, stored: int = 224) -> np.ndarray:
    """Centres of the view's patches (row-major (d, h, w), as the backbone orders its tokens) in
    the stored frame (voxel index x 1 mm), (N, 3)."""
    start = (stored - view.crop) // 2
    patch = view.size / grid[0]
    idx = np.stack(np.meshgrid(*(np.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    return start + (idx + 0.5) * patch * view.crop / view.size - 0.5


def _tokens(frame: pd.DataFrame) -> np.ndarray:
    """Patch tokens (n, N, D) without CLS."""
    return matrix(frame, "tokens", dim=len(frame["cls"].iloc[0]))[:, 1:]


def labelled(spec: TaskSpec, frame: pd.DataFrame, masks: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The rows of `frame` that have the task's target (a mask task: a mask in `masks`)."""
    if spec.kind == "mask":
        return frame[frame["scan_id"].isin(masks or {})]
    return frame.dropna(subset=list(spec.columns))


def _target(spec: TaskSpec, frame: pd.DataFrame, masks: dict[str, np.ndarray] | None) -> np.ndarray:
    if spec.kind == "mask":
        return np.stack([masks[s] for s in frame["scan_id"]])
    y = frame[list(spec.columns)].to_numpy(np.float64)
    return y[:, 0] if spec.kind in ("binary", "continuous") else y


def _inputs(spec: TaskSpec, frame: pd.DataFrame) -> np.ndarray:
    return _tokens(frame) if spec.kind in ("point", "mask") else matrix(frame, "cls")


def fit_probe_for(
    spec: TaskSpec,
    probe: Probe,
    train: pd.DataFrame,
    val: pd.DataFrame,
    view: ViewConfig,
    masks: dict[str, np.ndarray] | None = None,
    cfg: ProbeConfig = ProbeConfig(),
) -> Callable[[pd.DataFrame], np.ndarray]:
    """Fit `probe` for `spec` on the labelled rows of `train` (embeddings joined with the label
    table; `masks`: scan_id -> label volume at the view, `view_labels`), selecting on `val`.
    Returns a function of a frame's rows giving predictions: probabilities (binary), values
    (continuous), risks (survival), points in stored mm (n, 3), or label volumes."""
    if probe not in PROBES[spec.kind]:
        raise ValueError(
            f"task {spec.name} ({spec.kind}) takes the probes {PROBES[spec.kind]}, not {probe!r}"
        )
    if probe == "retrieval":
        raise ValueError("retrieval trains nothing: score the test split with `score`")
    train, val = labelled(spec, train, masks), labelled(spec, val, masks)
    x, y = _inputs(spec, train), _target(spec, train, masks)
    xv, yv = _inputs(spec, val), _target(spec, val, masks)
    grid = (round(x.shape[1] ** (1 / 3)),) * 3 if spec.kind in ("point", "mask") else None
    if probe == "knn":
        predict = knn_probe(x, y, xv, yv)[1]
    elif probe == "mlp":
        predict = mlp_probe(spec.kind, x, y, xv, yv, cfg)
    elif probe == "attention":
        predict = point_probe(x, y, xv, yv, patch_positions(grid, view), cfg)
    else:
        predict = mask_probe(x, y, xv, yv, grid, spec.n_classes, cfg)
    return lambda frame: predict(_inputs(spec, frame))


def score(
    spec: TaskSpec,
    frame: pd.DataFrame,
    pred: np.ndarray | None,
    masks: dict[str, np.ndarray] | None = None,
    train: pd.DataFrame | None = None,
) -> dict[str, float]:
    """The category's metrics of predictions `pred` on the labelled rows `frame` (retrieval: none,
    the CLS of `frame` itself); survival's time-dependent AUROC uses the censoring and the
    median event time of `train` (`frame` itself when not given)."""
    y = _target(spec, frame, masks)
    if spec.kind == "binary" and pred is None:
        return recall_at_k(matrix(frame, "cls"), {spec.name: y})
    if spec.kind == "binary":
        return {"auroc": auroc(y, pred), "ap": average_precision(y, pred)}
    if spec.kind == "continuous":
        ref = y if train is None else _target(spec, train, masks)
        return regression_metrics(y, pred, scale=float(ref.std()) or 1.0)
    if spec.kind == "survival":
        ref = y if train is None else _target(spec, train, masks)
        horizon = spec.horizon or float(np.median(ref[ref[:, 1] == 1, 0]))
        td = time_dependent_auroc(y[:, 0], y[:, 1], pred, horizon, ref[:, 0], ref[:, 1])
        return {"c_index": c_index(y[:, 0], y[:, 1], pred), "td_auroc": td, "horizon": horizon}
    if spec.kind == "point":
        err = localisation_error(pred, y)
        return {"error_mm": float(err.mean()), "median_error_mm": float(np.median(err))}
    return dice_scores(pred, y, spec.n_classes)


def prediction_rows(
    spec: TaskSpec, frame: pd.DataFrame, pred: np.ndarray | None, masks: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """Per-scan rows of predictions `pred` on the labelled rows `frame` (as `score` takes them), what
    the report's intervals (by patient) and paired tests need: scan_id, patient_id and
    binary: y, score; retrieval (`pred` None): one row per positive query, its positive's rank
    among the candidates (`retrieval_ranks`); continuous: y, pred; survival: time, event, risk;
    point: y_{x,y,z}, p_{x,y,z}, error_mm; mask: inter_<c>, total_<c> voxel counts per class
    (`dice_counts`)."""
    base = frame[["scan_id", "patient_id"]].reset_index(drop=True)
    y = _target(spec, frame, masks)
    if spec.kind == "binary" and pred is None:
        rows, ranks, candidates = retrieval_ranks(matrix(frame, "cls"), y)
        # the candidates are drawn from the pool's order and labels: two models' ranks pair up
        # only over the same pool (the report checks `pool`)
        pool = hashlib.sha1(repr((list(base["scan_id"]), y.tolist())).encode()).hexdigest()[:16]
        return base.iloc[rows].reset_index(drop=True).assign(rank=ranks, candidates=candidates, pool=pool)
    if spec.kind == "binary":
        return base.assign(y=y, score=pred)
    if spec.kind == "continuous":
        return base.assign(y=y, pred=pred)
    if spec.kind == "survival":
        return base.assign(time=y[:, 0], event=y[:, 1], risk=pred)
    if spec.kind == "point":
        points = {f"{w}_{a}": v[:, j] for w, v in (("y", y), ("p", pred)) for j, a in enumerate("xyz")}
        return base.assign(**points, error_mm=localisation_error(pred, y))
    counts = np.stack([dice_counts(p, t, spec.n_classes) for p, t in zip(pred, y, strict=True)])
    return base.assign(
        **{
            f"{w}_{c}": counts[:, c - 1, j]
            for c in range(1, spec.n_classes)
            for j, w in enumerate(("inter", "total"))
        }
    )


def run_probe(
    spec: TaskSpec,
    probe: Probe,
    train: pd.DataFrame,
    val: pd.DataFrame,
    test: pd.DataFrame,
    view: ViewConfig,
    masks: dict[str, np.ndarray] | None = None,
    cfg: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """`fit_probe_for` on `train` and `val`, then the metrics of its predictions on `test`
    (retrieval: `test`'s own CLS, nothing fitted)."""
    test = labelled(spec, test, masks)
    if probe == "retrieval":
        if spec.kind != "binary":
            raise ValueError(f"retrieval is for binary labels, not {spec.kind} ({spec.name})")
        return score(spec, test, None)
    predict = fit_probe_for(spec, probe, train, val, view, masks, cfg)
    return score(spec, test, predict(test), masks, labelled(spec, train, masks))


# -- the sweep's matrix ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteConfig:
    """The probe suite's Tune matrix (`fmct_ray.downstream.tune.run_probe_sweep`): models (one
    embeddings file each, from the command line) x tasks x their probes x training sites x seeds x
    lrs (each probe's small search space; retrieval trains nothing, so it runs once per site).
    Every trial fits on its site's train split, selects on its val split and scores every site's
    test split (external validation).

    Args:
        tasks: the tasks (`TaskSpec`; masks: `columns` names the store's mask).
        probes: only these probes (empty: every probe of each task's category).
        sites: training sites (empty: every site of the label table).
        seeds: seeds per configuration.
        lrs: learning rates searched (trained probes).
        view: the evaluation view the embeddings were made with (masks and points use it).
        probe: the probes' recipe (epochs, batch, hidden width, ...); `lr` and `seed` come from
            the matrix.
    """

    tasks: tuple[TaskSpec, ...] = ()
    probes: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    seeds: int = 1
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    view: ViewConfig = ViewConfig()
    probe: ProbeConfig = ProbeConfig()


def suite_runs(cfg: SuiteConfig, sites: list[str], models: list[str] = ("model",)) -> list[dict]:
    """One dict per trial of the suite's matrix."""
    runs = []
    for model in models:
        for spec in cfg.tasks:
            for probe in PROBES[spec.kind]:
                if cfg.probes and probe not in cfg.probes:
                    continue
                trained = probe != "retrieval"
                for site in sites:
                    for seed in range(cfg.seeds if trained else 1):
                        for lr in cfg.lrs if trained else (0.0,):
                            run = {"task": spec.name, "probe": probe, "site": site, "seed": seed, "lr": lr}
                            runs.append({"model": model, **run})
    return runs


def suite_key(run: dict) -> str:
    return f"probe-{run['model']}-{run['task']}-{run['probe']}-{run['site']}-s{run['seed']}-lr{run['lr']:g}"


def validation_value(spec: TaskSpec, metrics: dict[str, float]) -> float:
    """The metric that selects (higher is better): AUROC, -MAE, C-index, -distance, macro Dice."""
    return {
        "binary": lambda m: m["auroc"],
        "continuous": lambda m: -m["mae"],
        "survival": lambda m: m["c_index"],
        "point": lambda m: -m["error_mm"],
        "mask": lambda m: m["dice_macro"],
    }[spec.kind](metrics)


def view_affine(view: ViewConfig, stored_affine: np.ndarray, stored: int = 224) -> np.ndarray:
    """Voxel -> world (RAS mm) affine of a volume on the evaluation view's grid (a segmentation
    prediction), given the stored volume's own affine (the store's `affine` attribute)."""
    step = view.crop / view.size
    to_stored = np.diag([step, step, step, 1.0])
    to_stored[:3, 3] = (stored - view.crop) // 2 + step / 2 - 0.5  # view voxel centres in stored indices
    return np.asarray(stored_affine, dtype=np.float64) @ to_stored


def prediction_nifti(labels: np.ndarray, view: ViewConfig, stored_affine: np.ndarray) -> bytes:
    """A predicted label volume (view grid) as a gzipped NIfTI file in the scan's world frame, to
    view over the stored volume (or the original scan) in any viewer."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), view_affine(view, stored_affine))
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
