"""The probe suite's report: one section per task category, each a table (metric [95% CI] by
patient bootstrap, the category's other metrics, the p-value of the paired permutation test
against the reference model on the same scans) and a figure, plus external validation.

Reads what the suite's trials wrote under the experiment folder (`fmct_ray.downstream.tune.
probe_trial`): `probe_predictions/*.parquet` (per scan) and `probes/*.parquet` (per evaluated
site: the metrics that need the training split, such as the time-dependent AUROC). For every
model, task, probe and training site, the run kept is the first seed's with the best validation
value over the learning rates. Writes to `out_dir`:
- `suite.md` / `suite.csv`: in-domain results (trained and evaluated on one site), by category;
- `suite_external.csv`: the primary metric for every (training site, evaluated site) pair;
- figures: `suite_regression_<task>.png` (predicted against true), `suite_km_<task>.png`
  (Kaplan-Meier curves of the test scans split at the median predicted risk),
  `suite_recall_<task>.png` (Recall@k against k, with chance), `suite_localisation_<task>.png`
  (distance error histogram), `suite_segmentation_<task>.png` (one test scan's prediction over
  its stored volume and mask, when the stores are given).
VoxelFM's seventh category, report generation, needs a language model and is not part of the suite.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmct_ray.eval import metrics as M
from fmct_ray.eval.tables import markdown_table
from fmct_ray.eval.task_metrics import c_index, dice_from_counts
from fmct_ray.storage import StorageConfig, filesystem, join

RUN = ["model", "task", "probe", "site"]


@dataclass(frozen=True)
class Primary:
    """A category's headline metric on per-scan rows (arrays by column): `swap` are the columns a
    paired test exchanges between two models (`rank`: ranked first, scores on any scale)."""

    title: str
    metric: str
    fn: Callable[[dict[str, np.ndarray]], float]
    swap: Callable[[pd.DataFrame], list[str]]
    rank: bool = False
    others: tuple[str, ...] = ()
    higher_is_better: bool = True


def _dice(d: dict[str, np.ndarray]) -> float:
    classes = sorted(int(k[6:]) for k in d if re.fullmatch(r"inter_\d+", k))
    counts = [[d[f"inter_{c}"].sum(), d[f"total_{c}"].sum()] for c in classes]
    return dice_from_counts(counts)["dice_macro"]


PRIMARY = {
    "classification": Primary(
        "Classification", "auroc", lambda d: M.auroc(d["y"], d["score"]), lambda f: ["score"], True, ("ap",)
    ),
    "retrieval": Primary(
        "Retrieval (cosine similarity of CLS, 1 positive + up to 99 negatives per query)",
        "recall@10",
        lambda d: float((d["rank"] < 10).mean()),
        lambda f: ["rank"],
        others=("recall@1", "recall@5", "chance@10"),
    ),
    "regression": Primary(
        "Regression",
        "mae",
        lambda d: float(np.abs(d["y"] - d["pred"]).mean()),
        lambda f: ["pred"],
        others=("mae_z", "r2", "pearson_r"),
        higher_is_better=False,
    ),
    "survival": Primary(
        "Survival",
        "c_index",
        lambda d: c_index(d["time"], d["event"], d["risk"]),
        lambda f: ["risk"],
        True,
        ("td_auroc", "horizon"),
    ),
    "localisation": Primary(
        "Localisation (mm, stored frame)",
        "error_mm",
        lambda d: float(d["error_mm"].mean()),
        lambda f: ["error_mm"],
        others=("median_error_mm",),
        higher_is_better=False,
    ),
    "segmentation": Primary(
        "Segmentation (Dice over the test scans' voxels, background excluded)",
        "dice_macro",
        _dice,
        lambda f: [c for c in f.columns if c.startswith(("inter_", "total_"))],
        others=("dice_micro", "dice_1", "dice_2", "dice_3"),
    ),
}
CATEGORY = {
    "continuous": "regression",
    "survival": "survival",
    "point": "localisation",
    "mask": "segmentation",
}


def category(kind: str, probe: str) -> str:
    if kind == "binary":
        return "retrieval" if probe == "retrieval" else "classification"
    return CATEGORY[kind]


def _read_all(results_uri: str, folder: str, storage: StorageConfig | None) -> pd.DataFrame:
    fs, root = filesystem(results_uri, storage)
    frames = []
    for path in sorted(fs.glob(join(root, folder, "*.parquet"))):
        with fs.open(path, "rb") as f:
            frames.append(pd.read_parquet(f))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def selected_runs(preds: pd.DataFrame) -> pd.DataFrame:
    """Rows of the kept runs: per model, task, probe and training site, the first seed's run with
    the best validation value (retrieval: its one run)."""
    runs = preds.drop_duplicates([*RUN, "seed", "lr"])[[*RUN, "seed", "lr", "val"]].fillna({"val": -np.inf})
    runs = runs[runs["seed"] == runs.groupby(RUN)["seed"].transform("min")]
    best = runs.loc[runs.groupby(RUN)["val"].idxmax(), [*RUN, "seed", "lr"]]
    return preds.merge(best, on=[*RUN, "seed", "lr"])


def _arrays(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: frame[c].to_numpy() for c in frame.columns if frame[c].dtype.kind in "fiub"}


def _value(primary: Primary, frame: pd.DataFrame) -> float:
    try:
        return primary.fn(_arrays(frame))
    except ValueError:
        return float("nan")  # undefined on this split (e.g. one class only)


def _interval(primary: Primary, g: pd.DataFrame, cfg) -> M.Interval:
    d = _arrays(g)
    try:
        return M.bootstrap_interval(
            lambda i: primary.fn({k: v[i] for k, v in d.items()}),
            len(g),
            g["patient_id"].to_numpy(),
            cfg.n_resamples,
            cfg.level,
            cfg.seed,
        )
    except ValueError:
        return M.Interval(_value(primary, g), float("nan"), float("nan"))


def _paired_p(primary: Primary, a: pd.DataFrame, b: pd.DataFrame, cfg) -> float:
    """p-value of the paired permutation test of model A against B on the scans (retrieval: the
    queries) both were scored on."""
    key = ["scan_id"]
    pair = a.merge(b, on=key, suffixes=("", "_ref"))
    if len(pair) < 2 or ("pool" in pair and (pair["pool"].fillna("") != pair["pool_ref"].fillna("")).any()):
        return float("nan")  # nothing to pair, or retrieval ranked against other candidates
    cols = primary.swap(a)
    d = _arrays(pair)
    if primary.rank:
        from scipy import stats

        for c in cols:
            d[c], d[f"{c}_ref"] = stats.rankdata(d[c]) / len(pair), stats.rankdata(d[f"{c}_ref"]) / len(pair)

    def difference(swap: np.ndarray) -> float:
        mine = {**d, **{c: np.where(swap, d[f"{c}_ref"], d[c]) for c in cols}}
        ref = {**d, **{c: np.where(swap, d[c], d[f"{c}_ref"]) for c in cols}}
        return primary.fn(mine) - primary.fn(ref)

    try:
        return M.paired_permutation(
            difference, len(pair), pair["patient_id"].to_numpy(), cfg.n_permutations, cfg.seed
        )[1]
    except ValueError:
        return float("nan")


def _where(frame: pd.DataFrame, **values) -> pd.DataFrame:
    """The rows of `frame` whose columns equal `values`."""
    return frame[np.logical_and.reduce([frame[c] == v for c, v in values.items()])]


def suite_tables(
    preds: pd.DataFrame, scores: pd.DataFrame, cfg, reference: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(in-domain table: one row per category x task x probe x site x model, external table: the
    primary metric per task x probe x model x training site x evaluated site)."""
    kept = selected_runs(preds)
    kept = kept.assign(category=[category(k, p) for k, p in zip(kept["kind"], kept["probe"], strict=True)])
    rows, external = [], []
    for (cat, task, probe, model, site, eval_site), g in kept.groupby(
        ["category", "task", "probe", "model", "site", "eval_site"], sort=True
    ):
        primary = PRIMARY[cat]
        external.append(
            {
                "category": cat,
                "task": task,
                "probe": probe,
                "model": model,
                "train_site": site,
                "eval_site": eval_site,
                "metric": primary.metric,
                "value": _value(primary, g),
            }
        )
        if site != eval_site:
            continue
        ci = _interval(primary, g, cfg)
        run = g.iloc[0]
        key = {"task": task, "probe": probe, "site": site, "eval_site": eval_site}
        match = _where(scores, model=model, seed=run["seed"], lr=run["lr"], **key)
        others = {m: match[m].iloc[0] for m in primary.others if m in match.columns and len(match)}
        p = float("nan")
        if reference and model != reference:
            ref = _where(kept, model=reference, **key)
            p = _paired_p(primary, g, ref, cfg) if len(ref) else float("nan")
        rows.append(
            {
                "category": cat,
                "task": task,
                "probe": probe,
                "site": site,
                "model": model,
                "n": g["scan_id"].nunique(),
                "lr": run["lr"],
                "metric": primary.metric,
                "value": ci.estimate,
                "lo": ci.lo,
                "hi": ci.hi,
                **others,
                "p_vs_reference": p,
            }
        )
    return pd.DataFrame(rows), pd.DataFrame(external)


def _markdown(table: pd.DataFrame, external: pd.DataFrame, reference: str | None) -> str:
    ref = f"`{reference}`" if reference else "none given"
    md = (
        "# Probe suite\n\nFrozen-backbone probes per task category (VoxelFM's categories without report"
        " generation, which needs a language model). In-domain: trained and evaluated on the same"
        " site's splits. Intervals: 95% bootstrap by patient; p: two-sided paired permutation test"
        f" against the reference model ({ref}) on the same scans.\n"
    )
    for cat, primary in PRIMARY.items():
        t = table[table["category"] == cat] if len(table) else table
        if t.empty:
            continue
        t = t.assign(
            **{
                primary.metric: [
                    f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in t[["value", "lo", "hi"]].to_numpy()
                ]
            }
        )
        cols = ["task", "probe", "site", "model", "n", primary.metric]
        cols += [c for c in primary.others if c in t.columns and t[c].notna().any()] + ["p_vs_reference"]
        better = "higher" if primary.higher_is_better else "lower"
        md += f"\n## {primary.title}\n\n{primary.metric} ({better} is better)\n\n" + markdown_table(t[cols])
    if len(external):
        index = ["task", "probe", "metric", "model", "train_site"]
        wide = external.pivot_table(
            index=index, columns="eval_site", values="value", observed=True, dropna=False
        ).dropna(how="all")
        md += (
            "\n## External validation\n\nThe primary metric of a probe trained on one site (`train_site`)"
            " and evaluated as-is on every site's test split (columns).\n\n"
        ) + markdown_table(wide.reset_index().rename_axis(columns=None))
    return md


def write_suite_report(
    results_uri: str,
    out_dir: str | Path,
    cfg=None,
    storage: StorageConfig | None = None,
    reference: str | None = None,
    stores: dict[str, str] | None = None,
) -> dict[str, Path]:
    """The suite's tables and figures (module docstring); returns {name: path}.

    Args:
        results_uri: the study's experiment folder (`<storage_path>/<name>`).
        out_dir: local folder.
        cfg: statistics settings (`fmct_ray.eval.report.ReportConfig`).
        storage: credentials reference of `results_uri` and the stores.
        reference: the model the others are tested against (e.g. "random").
        stores: site -> store URI, for the segmentation overlay (left out without).
    """
    from fmct_ray.eval import figures
    from fmct_ray.eval.report import NoResults, ReportConfig

    cfg = cfg or ReportConfig()
    preds = _read_all(results_uri, "probe_predictions", storage)
    if preds.empty:
        raise NoResults(f"no probe predictions under {results_uri}/probe_predictions (has the suite run?)")
    if reference and reference not in set(preds["model"]):
        raise ValueError(
            f"reference model {reference!r} is not among the suite's models {sorted(set(preds['model']))}"
        )
    table, external = suite_tables(preds, _read_all(results_uri, "probes", storage), cfg, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "suite_csv": out / "suite.csv",
        "suite_md": out / "suite.md",
        "suite_external_csv": out / "suite_external.csv",
    }
    table.to_csv(written["suite_csv"], index=False)
    external.to_csv(written["suite_external_csv"], index=False)
    written["suite_md"].write_text(_markdown(table, external, reference))
    kept = selected_runs(preds)
    kept = kept[kept["site"] == kept["eval_site"]]
    written.update(figures.suite_figures(kept, out))
    if stores:
        fs, root = filesystem(results_uri, storage)
        written.update(
            figures.segmentation_overlays(kept, fs, join(root, "segmentations"), stores, storage, out)
        )
    return written
