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
    err = np.nan_to_num(np.vstack([table["auroc"] - table["auroc_lo"], table["auroc_hi"] - table["auroc"]]))
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


def suite_figures(kept: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The probe suite's figure per task (`fmct_ray.eval.suite_report`), from the per-scan rows of
    the kept in-domain runs: regression scatter, Kaplan-Meier curves by predicted risk group,
    Recall@k curve, localisation error histogram; one panel per model, one colour per site."""
    from fmct_ray.eval.task_metrics import kaplan_meier

    plt, written = _plt(), {}
    for (kind, probe, task), g in kept.groupby(["kind", "probe", "task"]):
        models = sorted(g["model"].unique())
        if kind == "binary" and probe == "retrieval":
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for (model, site), r in g.groupby(["model", "site"]):
                n = int(r["candidates"].max())
                k = np.arange(1, n + 1)
                ax.plot(k, [(r["rank"] < kk).mean() for kk in k], label=f"{model} {site}")
            ax.plot(k, k / n, "k:", label="chance")
            ax.set(xscale="log", xlabel="k", ylabel="Recall@k", title=f"{task}: retrieval", ylim=(0, 1.02))
            ax.legend(fontsize=7)
            written[f"suite_recall_{task}"] = _save(fig, out / f"suite_recall_{task}.png")
            continue
        if kind not in ("continuous", "survival", "point"):
            continue
        fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            for i, (site, r) in enumerate(g[g["model"] == model].groupby("site")):
                if kind == "continuous":
                    ax.scatter(r["y"], r["pred"], s=10, color=f"C{i}", label=site)
                    lo, hi = r[["y", "pred"]].min().min(), r[["y", "pred"]].max().max()
                    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
                    ax.set(xlabel="true", ylabel="predicted")
                elif kind == "survival":
                    high = r["risk"].to_numpy() > np.median(r["risk"])
                    for group, ls in ((high, "-"), (~high, "--")):
                        if not group.any():
                            continue  # constant risks: one group
                        t, e = r["time"].to_numpy()[group], r["event"].to_numpy()[group]
                        grid = np.linspace(0, r["time"].max(), 200)
                        name = "high" if ls == "-" else "low"
                        ax.step(
                            grid,
                            kaplan_meier(t, e)(grid),
                            where="post",
                            ls=ls,
                            color=f"C{i}",
                            label=f"{site} {name} risk",
                        )
                    ax.set(xlabel="time", ylabel="survival", ylim=(0, 1.02))
                else:
                    ax.hist(r["error_mm"], bins=20, alpha=0.6, color=f"C{i}", label=site)
                    ax.set(xlabel="distance error (mm)", ylabel="scans")
            ax.set_title(model)
            ax.legend(fontsize=7)
        name = {"continuous": "regression", "survival": "km", "point": "localisation"}[kind]
        fig.suptitle(f"{task}: {name}")
        written[f"suite_{name}_{task}"] = _save(fig, out / f"suite_{name}_{task}.png")
    return written


def segmentation_overlays(
    kept: pd.DataFrame, fs, root: str, stores: dict, storage, out: Path
) -> dict[str, Path]:
    """Per mask task: one test scan (the first every model predicted) at the axial slice with the
    most labelled voxels; its stored volume with the stored mask, and each model's prediction read
    back from its NIfTI (`<root>/<run key>/<scan_id>.nii.gz`) and placed by the NIfTI's affine."""
    import gzip

    import nibabel as nib

    from fmct_ray.ingest import SiteStore

    plt, written = _plt(), {}
    for task, g in kept[kept["kind"] == "mask"].groupby("task"):
        site = sorted(g["site"].unique())[0]
        g = g[g["site"] == site]
        models = sorted(g["model"].unique())
        common = set.intersection(*(set(g.loc[g["model"] == m, "scan_id"]) for m in models))
        if site not in stores or not common:
            continue
        scan = sorted(common)[0]
        store = SiteStore(stores[site], storage)
        volume, truth = store.read_volume(scan), store.read_mask(scan, g["mask_name"].iloc[0])
        fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.4 * (len(models) + 1), 3.6), squeeze=False)
        for ax, model in zip(axes[0][1:], models, strict=True):
            key = g.loc[g["model"] == model, "key"].iloc[0]
            with fs.open(f"{root}/{key}/{scan}.nii.gz", "rb") as f:
                image = nib.Nifti1Image.from_bytes(gzip.decompress(f.read()))
            pred = np.asarray(image.dataobj)
            to_stored = np.linalg.inv(store.affine(scan)) @ image.affine
            idx = np.indices(pred.shape).reshape(3, -1)
            # the stored voxel each view voxel samples, as `view_labels` cuts targets (floor of the
            # view voxel's centre; the epsilon absorbs the NIfTI header's float32 affine)
            at = np.floor(to_stored[:3, :3] @ idx + to_stored[:3, 3:] + 0.5 + 1e-4).astype(int)
            at = tuple(np.clip(a, 0, n - 1) for a, n in zip(at, volume.shape, strict=True))
            img, lab = volume[at].reshape(pred.shape), truth[at].reshape(pred.shape)
            z = int(np.argmax((lab > 0).sum((0, 1))))
            panels = [(ax, pred, model)]
            if ax is axes[0][1]:  # the stored mask once: every model's view grid is the same
                panels.append((axes[0][0], lab, f"stored mask ({site} {scan[:8]})"))
            for a, labels, title in panels:
                a.imshow(np.clip((img[:, :, z].T + 40) / 160, 0, 1), cmap="gray", origin="lower")
                a.imshow(np.ma.masked_equal(labels[:, :, z].T, 0), cmap="autumn", alpha=0.5, origin="lower")
                a.set_title(title, fontsize=8)
                a.axis("off")
        fig.suptitle(f"{task}: segmentation, axial slice {z} of the view")
        written[f"suite_segmentation_{task}"] = _save(fig, out / f"suite_segmentation_{task}.png")
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
