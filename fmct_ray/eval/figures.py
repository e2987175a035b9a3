"""PNG figures of the downstream and study reports (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fewshot_curves(few: pd.DataFrame, out: Path) -> dict[str, Path]:
    """One figure per task: AUROC mean and interval against K, a line per site and mode."""
    plt, written = _plt(), {}
    for task, g in few[few["shots"] > 0].groupby("task"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (site, mode), c in g.groupby(["site", "mode"]):
            c = c.sort_values("shots")
            ax.plot(c["shots"], c["mean"], marker="o", label=f"{site} {mode}")
            ax.fill_between(c["shots"], c["lo"].clip(upper=1), c["hi"].clip(upper=1), alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="K (positives = negatives)", ylabel="AUROC", title=f"{task}: few-shot", ylim=(0.4, 1.02)
        )
        ax.legend(fontsize=7)
        written[f"fewshot_{task}"] = _save(fig, out / f"fewshot_{task}.png")
    return written


def auroc_bars(table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """AUROC with bootstrap intervals per task, grouped by site and mode."""
    if table.empty:
        return {}
    plt = _plt()
    labels = [f"{s}\n{m}" for s, m in zip(table["site"], table["mode"])]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(table)), 3.5))
    x = np.arange(len(table))
    err = np.vstack([table["auroc"] - table["auroc_lo"], table["auroc_hi"] - table["auroc"]])
    colors = {t: f"C{i}" for i, t in enumerate(sorted(table["task"].unique()))}
    ax.bar(x, table["auroc"], yerr=err, capsize=3, color=[colors[t] for t in table["task"]])
    ax.set_xticks(x, labels, fontsize=6, rotation=90)
    ax.set(ylabel="AUROC (95% CI)", ylim=(0.0, 1.05), title="held-out AUROC by task (colour), site and mode")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=t) for t, c in colors.items()], fontsize=7)
    return {"auroc_bars": _save(fig, out / "auroc_bars.png")}


def external_matrices(ext: pd.DataFrame, out: Path) -> dict[str, Path]:
    """Per task: train site x eval site AUROC matrix, one panel per mode."""
    plt, written = _plt(), {}
    for task, g in ext.groupby("task"):
        modes = sorted(g["mode"].unique())
        fig, axes = plt.subplots(1, len(modes), figsize=(3.2 * len(modes), 3), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            m = g[g["mode"] == mode].pivot(index="train_site", columns="eval_site", values="auroc")
            im = ax.imshow(m.to_numpy(dtype=float), vmin=0.5, vmax=1.0, cmap="viridis")
            ax.set_xticks(range(m.shape[1]), m.columns, rotation=45)
            ax.set_yticks(range(m.shape[0]), m.index)
            for (i, j), v in np.ndenumerate(m.to_numpy(dtype=float)):
                ax.text(
                    j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8
                )
            ax.set(title=mode, xlabel="evaluated on", ylabel="trained on")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="AUROC")
        fig.suptitle(f"{task}: external validation")
        written[f"external_{task}"] = _save(fig, out / f"external_{task}.png")
    return written


def attention_figure(model, x, voxel_mm: float, title: str, path: Path) -> Path:
    """Three orthogonal slices of the view (brain window channel) with the attention-distance map."""
    import torch

    from fmct_ray.eval.attention import distance_map

    plt = _plt()
    dmap = distance_map(model, x, voxel_mm)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(dmap)[None, None], size=x.shape[2:], mode="trilinear"
    )[0, 0]
    img = x[0, 0].cpu().numpy()
    mids = [s // 2 for s in img.shape]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, axis in zip(axes, range(3)):
        sl = [slice(None)] * 3
        sl[axis] = mids[axis]
        ax.imshow(img[tuple(sl)].T, cmap="gray", origin="lower")
        im = ax.imshow(up.numpy()[tuple(sl)].T, cmap="magma", alpha=0.5, origin="lower")
        ax.axis("off")
    fig.colorbar(im, ax=axes.tolist(), label="mean attention distance (mm)")
    fig.suptitle(title)
    return _save(fig, path)


def pretraining_curves(runs: dict[str, pd.DataFrame], path: Path) -> Path:
    """Loss, DINO teacher entropies, CLS spread and lr against samples for pretraining runs
    (objective -> its metrics.csv), as the study's report shows them."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for obj, m in runs.items():
        axes[0].plot(m["samples"], m[obj], label=f"{obj} loss")
        if obj == "dino":
            axes[1].plot(m["samples"], m["teacher_entropy"], label="teacher entropy")
            axes[1].plot(m["samples"], m["teacher_marginal_entropy"], label="marginal entropy")
            axes[1].axhline(float(m["log_k"].iloc[0]), color="k", ls=":", label="log K")
            axes[2].plot(m["samples"], m["student_cls_std"], label="student CLS std")
            axes[2].plot(m["samples"], m["teacher_cls_std"], label="teacher CLS std")
        axes[3].plot(m["samples"], m["lr"], label=f"{obj} lr")
    titles = ("loss", "DINO teacher entropies (nats)", "CLS spread across the batch", "learning rate")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(title=title, xlabel="samples")
        ax.legend(fontsize=7)
    return _save(fig, path)


def study_fewshot_curves(summary: pd.DataFrame, path: Path) -> Path:
    """One panel per task: test AUROC mean and interval against K, a line per backbone family."""
    plt = _plt()
    tasks = sorted(summary["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for fam, c in summary[summary["task"] == task].groupby("backbone"):
            c = c.sort_values("shots")
            ax.plot(c["shots"], c["mean"], marker="o", label=fam)
            ax.fill_between(c["shots"], c["lo"], c["hi"], alpha=0.15)
        ax.axhline(0.5, color="k", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=task, xlabel="K (positives = negatives)", ylabel="test AUROC", ylim=(0.3, 1.02))
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
