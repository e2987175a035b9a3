"""The report of a sweep: a table of every task x site x mode and the paper's figures.

Reads the per-run prediction files a sweep wrote (`<experiment>/predictions/*.parquet`) and
writes to `out_dir`:
- `results.csv` / `results.md`: task, site, mode, n, positives, AUROC [95% CI] (bootstrap by
  patient), AP, p-value of the paired permutation test against scratch on the same scans, and
  macro-AUC per site and mode;
- `fewshot.csv` and `fewshot_<task>.png`: AUROC mean and interval over the seeds against K;
- `auroc_bars.png`: AUROC with intervals per task, site and mode;
- `external_<task>.png` / `external.csv`: AUROC of a model trained on each site (rows) evaluated
  as-is on the held-out split of each site (columns);
- `attention_distance.png` (optional): attention-distance map of one scan.
The scratch baseline of a task and site is its run with the best validation AUROC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmct_ray.eval import metrics as M
from fmct_ray.eval.tables import markdown_table
from fmct_ray.storage import StorageConfig, filesystem, join

KEYS = ["task", "train_site", "mode", "shots", "seed"]


class NoResults(FileNotFoundError):
    """A study folder without the files a report reads (the sweep or the suite has not run)."""


@dataclass(frozen=True)
class ReportConfig:
    """Statistics settings of a report.

    Args:
        n_resamples: bootstrap resamples (resampling patients).
        n_permutations: permutations of the paired test against scratch.
        level: interval coverage.
        seed: generator seed of both.
    """

    n_resamples: int = 1000
    n_permutations: int = 1000
    level: float = 0.95
    seed: int = 0


def load_predictions(results_uri: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """Every run's test predictions, with scratch runs reduced to the best one per task and site."""
    fs, root = filesystem(results_uri, storage)
    files = sorted(fs.glob(join(root, "predictions", "*.parquet")))
    if not files:
        raise NoResults(f"no prediction files under {results_uri}/predictions (has the sweep run?)")
    frames = []
    for f in files:
        with fs.open(f, "rb") as fh:
            frames.append(pd.read_parquet(fh).assign(run=Path(f).stem))
    preds = pd.concat(frames, ignore_index=True)
    scratch = preds[preds["kind"] == "scratch"]
    if len(scratch):
        runs = scratch.groupby(["task", "train_site", "run"])["val_auroc"].first().reset_index()
        best = runs.loc[runs.groupby(["task", "train_site"])["val_auroc"].idxmax(), "run"]
        preds = pd.concat(
            [
                preds[preds["kind"] != "scratch"],
                scratch[scratch["run"].isin(set(best))].assign(mode="scratch"),
            ],
            ignore_index=True,
        )
    return preds


def _scores(group: pd.DataFrame, cfg: ReportConfig) -> dict:
    """n, positives, AUROC with its bootstrap interval, AP; a test split with one class has no
    AUROC, and one with too few positives for a stable bootstrap no interval (NaN, not an error:
    one small site must not stop the report)."""
    y, s = group["label"].to_numpy(), group["score"].to_numpy()
    try:
        ci = M.bootstrap_ci(
            y, s, group["patient_id"].to_numpy(), n_resamples=cfg.n_resamples, level=cfg.level, seed=cfg.seed
        )
    except ValueError:
        both = 0 < y.sum() < len(y)
        ci = M.Interval(M.auroc(y, s) if both else np.nan, np.nan, np.nan)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": ci.estimate,
        "auroc_lo": ci.lo,
        "auroc_hi": ci.hi,
        "ap": M.average_precision(y, s) if not np.isnan(ci.estimate) else np.nan,
    }


def results_table(preds: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """In-domain results of the all-data runs (first seed): one row per task x site x mode."""
    main = preds[(preds["shots"] == 0) & (preds["train_site"] == preds["eval_site"])]
    main = main[main["seed"] == main.groupby(["task", "train_site", "mode"])["seed"].transform("min")]
    rows = []
    for (task, site, mode), g in main.groupby(["task", "train_site", "mode"], sort=True):
        row = {"task": task, "site": site, "mode": mode, **_scores(g, cfg), "p_vs_scratch": np.nan}
        ref = main[(main["task"] == task) & (main["train_site"] == site) & (main["mode"] == "scratch")]
        if mode != "scratch" and len(ref) and not np.isnan(row["auroc"]):
            pair = g.merge(ref[["scan_id", "score"]], on="scan_id", suffixes=("", "_scratch"))
            _, row["p_vs_scratch"] = M.paired_permutation_test(
                pair["label"].to_numpy(),
                pair["score"].to_numpy(),
                pair["score_scratch"].to_numpy(),
                groups=pair["patient_id"].to_numpy(),
                n_permutations=cfg.n_permutations,
                seed=cfg.seed,
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["auroc_ci"] = [
            "one class: no AUROC"
            if np.isnan(a)
            else f"{a:.3f} (too few positives for an interval)"
            if np.isnan(lo)
            else f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
            for a, lo, hi in zip(table["auroc"], table["auroc_lo"], table["auroc_hi"])
        ]
    return table


def fewshot_table(preds: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """AUROC mean and interval over seeds per task x site x mode x K (in-domain)."""
    inner = preds[preds["train_site"] == preds["eval_site"]]
    per_seed = inner.groupby(KEYS).apply(
        lambda g: M.auroc(g["label"], g["score"]) if g["label"].nunique() == 2 else np.nan,
        include_groups=False,
    )
    per_seed = per_seed.dropna()
    rows = []
    for (task, site, mode, shots), v in per_seed.groupby(level=[0, 1, 2, 3]):
        rows.append(
            {"task": task, "site": site, "mode": mode, "shots": shots, **M.few_shot_summary(v.values, level)}
        )
    return pd.DataFrame(rows)


def external_table(preds: pd.DataFrame) -> pd.DataFrame:
    """AUROC of all-data runs (first seed) for every (train site, eval site) pair."""
    full = preds[preds["shots"] == 0]
    full = full[full["seed"] == full.groupby(["task", "train_site", "mode"])["seed"].transform("min")]
    out = full.groupby(["task", "mode", "train_site", "eval_site"]).apply(
        lambda g: M.auroc(g["label"], g["score"]) if g["label"].nunique() == 2 else np.nan,
        include_groups=False,
    )
    return out.rename("auroc").reset_index()


def macro_table(table: pd.DataFrame) -> pd.DataFrame:
    return table.groupby(["site", "mode"])["auroc"].agg(macro_auc="mean", tasks="count").reset_index()


def write_report(
    results_uri: str,
    out_dir: str | Path,
    cfg: ReportConfig | None = None,
    storage: StorageConfig | None = None,
    attention: tuple | None = None,
) -> dict[str, Path]:
    """Tables and figures of a sweep; returns {name: path} of what was written.

    Args:
        results_uri: the sweep's experiment folder (`<storage_path>/<name>`).
        out_dir: local folder for the report.
        cfg: statistics settings.
        storage: credentials reference of `results_uri`.
        attention: optional (model, model input (1, C, D, H, W), voxel_mm, title) for the
            attention-distance figure.
    """
    from fmct_ray.eval import figures

    cfg = cfg or ReportConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = load_predictions(results_uri, storage)
    table = results_table(preds, cfg)
    few = fewshot_table(preds, cfg.level)
    ext = external_table(preds)
    written = {
        "results_csv": out / "results.csv",
        "results_md": out / "results.md",
        "fewshot_csv": out / "fewshot.csv",
        "external_csv": out / "external.csv",
    }
    table.to_csv(written["results_csv"], index=False)
    few.to_csv(written["fewshot_csv"], index=False)
    ext.to_csv(written["external_csv"], index=False)
    cols = ["task", "site", "mode", "n", "positives", "auroc_ci", "ap", "p_vs_scratch"]
    md = "# Downstream results\n\n" + markdown_table(table[cols] if len(table) else table)
    if len(table):
        md += "\n## Macro-AUC over tasks\n\n" + markdown_table(macro_table(table))
    written["results_md"].write_text(md)
    written.update(figures.fewshot_curves(few, out))
    written.update(figures.auroc_bars(table, out))
    written.update(figures.external_matrices(ext, out))
    if attention is not None:
        written["attention"] = figures.attention_figure(*attention, out / "attention_distance.png")
    return written
