"""Ray Tune fan-out of the downstream runs: the fine-tuning matrix and the scratch-baseline sweep.

- `run_finetune_sweep`: tasks x training sites x modes x K x seeds (`SweepConfig`), one Tune trial
  per run. Frozen modes train probes on cached embeddings (seconds on a CPU: give them a fraction
  of a CPU); full fine-tuning reads volumes (give it a GPU). Every trial predicts the test split
  of every site, so in-domain and external validation come from the same trial.
- `run_scratch_sweep`: randomly initialised ViTs, full training, over the 144-configuration grid
  of SPEC section 3 per task and site, or an Optuna (TPE) search with ASHA early stopping that
  tries far fewer configurations.

Trials report `val_auroc` after every epoch (model selection, ASHA) and write their test
predictions to `<storage>/<study>/predictions/<run key>.parquet`; the report reads that folder, so
the fine-tuning matrix and the scratch sweep of one study (same name) are reported together.
Results and checkpoints live on `storage_path` (local or s3://); running the same command again
restores the experiment with `Tuner.restore(..., resume_unfinished=True)`: finished trials are
kept, unfinished ones resume from their last checkpoint. Resources per trial come from the
command line (`SweepLaunch`). Ray is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fmct_ray.data.embed import load_embeddings
from fmct_ray.downstream.config import FinetuneConfig
from fmct_ray.downstream.finetune import run_finetune
from fmct_ray.storage import StorageConfig, atomic_write, filesystem, join

METRIC = "val_auroc"


@dataclass(frozen=True)
class SweepLaunch:
    """Where and how a sweep runs (command line, not the recipe).

    Args:
        name: study name: Tune experiments go to `<storage_path>/<name>/tune/<experiment>`, run
            predictions to `<storage_path>/<name>/predictions/`; the same name resumes.
        storage_path: local folder or s3://bucket/prefix for results, checkpoints, predictions.
        labels: labels.parquet (jobs/labels.py) of every site (local or s3://).
        embeddings: embeddings Parquet (fast path of the frozen modes; local or s3://).
        stores: site -> store URI (volume path: full fine-tuning, scratch).
        cpus_per_trial: CPUs per trial (fractions allowed for small probes).
        gpus_per_trial: GPUs per trial (fractions allowed for small probes).
        max_concurrent: concurrent trials (0: as many as the resources allow).
        storage: credentials reference of the storage path (and of s3:// labels and embeddings).
        resources: site -> custom resource of the sites pinned to their nodes (`SiteSpec.resource`):
            a trial that reads a pinned site's volumes runs on that site's nodes, and predicts the
            test split of another pinned site on that site's nodes.
        models: the probe suite's embeddings, model name -> Parquet (one matrix per model, the
            report comparing them on the same scans); empty: {"model": embeddings}.
    """

    name: str
    storage_path: str
    labels: str
    embeddings: str | None = None
    stores: dict[str, str] = field(default_factory=dict)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    resources: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)

    @property
    def experiment_uri(self) -> str:
        return join(self.storage_path.rstrip("/"), self.name)

    @property
    def suite_models(self) -> dict[str, str]:
        return self.models or ({"model": self.embeddings} if self.embeddings else {})


# -- the runs -------------------------------------------------------------------------------------
def _sites(cfg: FinetuneConfig, labels: pd.DataFrame) -> list[str]:
    return list(cfg.sweep.sites) or sorted(labels["site"].unique())


def finetune_runs(cfg: FinetuneConfig, sites: list[str]) -> list[dict[str, Any]]:
    """One dict per trial of the fine-tuning matrix."""
    runs = []
    for task, site, mode, shots in itertools.product(
        cfg.sweep.tasks or (cfg.task,), sites, cfg.sweep.modes, cfg.sweep.shots
    ):
        for seed in range(cfg.sweep.seeds if shots else cfg.sweep.full_data_seeds):
            runs.append(
                {"kind": "finetune", "task": task, "site": site, "mode": mode, "shots": shots, "seed": seed}
            )
    return runs


def feasible_runs(runs: list[dict[str, Any]], labels: pd.DataFrame, log=print) -> list[dict[str, Any]]:
    """The runs whose K-shot draw the site's train split allows (K labelled positives and K
    negatives), saying once per (task, site, K) which it leaves out and why."""
    train = labels[labels["split"] == "train"]
    keep, skipped = [], {}
    for run in runs:
        y = train.loc[train["site"] == run["site"], run["task"]]
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        if run["shots"] > min(pos, neg):
            skipped[(run["task"], run["site"], run["shots"])] = (pos, neg)
        else:
            keep.append(run)
    for (task, site, k), (pos, neg) in sorted(skipped.items()):
        log(f"== skipped: {task} at {site}, K={k}: its train split has {pos} positives, {neg} negatives")
    return keep


def scratch_grid(cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """The 3 x 4 x 4 x 3 = 144 scratch configurations of SPEC section 3 (with the default lists)."""
    s = cfg.sweep
    return [
        {"lr": lr, "weight_decay": wd, "epochs": ep, "optimizer": opt}
        for lr, wd, ep, opt in itertools.product(
            s.scratch_lrs, s.scratch_weight_decays, s.scratch_epochs, s.scratch_optimizers
        )
    ]


def run_key(run: dict[str, Any]) -> str:
    """Stable file name of a run's predictions (the same run always writes the same file)."""
    key = f"{run['kind']}-{run['task']}-{run['site']}-{run['mode']}-k{run['shots']}-s{run['seed']}"
    if run["kind"] == "scratch":
        key += f"-lr{run['lr']:g}-wd{run['weight_decay']:g}-e{run['epochs']}-{run['optimizer']}"
    return key


def run_config(cfg: FinetuneConfig, run: dict[str, Any]) -> FinetuneConfig:
    """The base config with one run's settings applied."""
    train = dataclasses.replace(cfg.train, shots=run["shots"], seed=run["seed"])
    out = dataclasses.replace(cfg, task=run["task"], mode=run["mode"], train=train)
    if run["kind"] == "scratch":
        optim = dataclasses.replace(
            cfg.optim,
            optimizer=run["optimizer"],
            backbone_lr=run["lr"],
            head_lr=run["lr"],
            weight_decay=run["weight_decay"],
        )
        backbone = dataclasses.replace(cfg.backbone, path=None, seed=run["seed"])
        out = dataclasses.replace(
            out,
            optim=optim,
            backbone=backbone,
            fast_path=False,
            train=dataclasses.replace(train, epochs=run["epochs"]),
        )
    return out


# -- inside a trial ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_table(labels: str, embeddings: str | None, storage: StorageConfig | None = None) -> pd.DataFrame:
    """Labels, joined with the cached embeddings when given (read once per worker process); both
    may be local or on the sweep's storage."""
    fs, path = filesystem(labels, storage)
    with fs.open(path, "rb") as f:
        table = pd.read_parquet(f)
    if embeddings:
        emb = load_embeddings(embeddings, storage).drop(
            columns=["patient_id", "site", "split"], errors="ignore"
        )
        table = table.merge(emb, on="scan_id", how="inner")
    return table


def write_predictions(launch: SweepLaunch, run: dict[str, Any], preds: pd.DataFrame, result) -> str:
    meta = {**run, "val_auroc": result.best_val_auroc, "best_epoch": result.best_epoch}
    frame = preds.rename(columns={"site": "eval_site"}).assign(
        train_site=run["site"], **{k: v for k, v in meta.items() if k != "site"}
    )
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    fs, root = filesystem(launch.experiment_uri, launch.storage)
    path = join(root, "predictions", run_key(run) + ".parquet")
    atomic_write(fs, path, buf.getvalue())
    return path


def trial(config: dict[str, Any], cfg: FinetuneConfig, launch: SweepLaunch) -> None:
    """One Tune trial: train, report val AUROC per epoch (checkpointed on the volume path), predict."""
    from ray import tune

    run = config.get("run", config)
    run = {**run, **{k: v for k, v in config.items() if k != "run"}}
    rcfg = run_config(cfg, run)
    volumes = not (rcfg.fast_path and rcfg.mode != "full")
    table = load_table(launch.labels, None if volumes else launch.embeddings, launch.storage)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None and volumes:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", weights_only=False)

    def report(metrics: dict, state) -> None:
        if not volumes:  # probes re-train in seconds: no checkpoint traffic
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state(), Path(d) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    result, preds = run_finetune(rcfg, table, run["site"], launch.stores, report, resume, launch.resources)
    write_predictions(launch, run, preds, result)


# -- building and running the Tuner ---------------------------------------------------------------
def _storage(launch: SweepLaunch):
    from fmct_ray.train.checkpoint import storage_filesystem

    return storage_filesystem(join(launch.experiment_uri, "tune"), launch.storage)


def build_tuner(
    cfg,
    launch: SweepLaunch,
    param_space: dict,
    name: str,
    search_alg=None,
    scheduler=None,
    num_samples: int = 1,
    fn=trial,
    metric: str = METRIC,
):
    """A Tuner over `fn` (default: the fine-tuning `trial`) named `name` under
    `<storage>/<study>/tune/`, or that experiment restored when it already exists there (finished
    trials kept, unfinished ones resumed)."""
    from ray import tune

    base = {"CPU": launch.cpus_per_trial, "GPU": launch.gpus_per_trial}

    def resources(config: dict) -> tune.PlacementGroupFactory:
        """A trial that reads a pinned site's volumes runs on one of its nodes."""
        run = {**config.get("run", config), **{k: v for k, v in config.items() if k != "run"}}
        rcfg = run_config(cfg, run) if fn is trial else None
        reads = rcfg is not None and not (rcfg.fast_path and rcfg.mode != "full")
        pinned = launch.resources.get(run.get("site")) if reads else None
        return tune.PlacementGroupFactory([{**base, **({pinned: 0.001} if pinned else {})}])

    trainable = tune.with_resources(tune.with_parameters(fn, cfg=cfg, launch=launch), resources)
    path, fs = _storage(launch)
    exp_path = join(path, name) if fs is not None else str(Path(path) / name)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        return tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=launch.max_concurrent or None,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


def _fit(tuner) -> pd.DataFrame:
    grid = tuner.fit()
    frame = grid.get_dataframe()
    errors = [str(r.error) for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed; first: {errors[0]}")
    return frame


def run_finetune_sweep(cfg: FinetuneConfig, launch: SweepLaunch) -> pd.DataFrame:
    """The fine-tuning matrix as one Tune experiment; returns Tune's results table."""
    from ray import tune

    labels = pd.read_parquet(launch.labels)  # once: the sites and the feasibility of each K-shot run
    runs = feasible_runs(finetune_runs(cfg, _sites(cfg, labels)), labels)
    return _fit(build_tuner(cfg, launch, {"run": tune.grid_search(runs)}, "finetune"))


def run_scratch_sweep(cfg: FinetuneConfig, launch: SweepLaunch) -> pd.DataFrame:
    """The scratch baseline per task and site: the full grid, or Optuna + ASHA."""
    from ray import tune

    base = [
        {"kind": "scratch", "task": t, "site": s, "mode": "full", "shots": 0, "seed": 0}
        for t in (cfg.sweep.tasks or (cfg.task,))
        for s in _sites(cfg, pd.read_parquet(launch.labels, columns=["site"]))
    ]
    if cfg.sweep.search == "grid":
        runs = [{**b, **g} for b in base for g in scratch_grid(cfg)]
        return _fit(build_tuner(cfg, launch, {"run": tune.grid_search(runs)}, "scratch"))
    frames = [_fit(_optuna_tuner(cfg, launch, b)) for b in base]
    return pd.concat(frames, ignore_index=True)


def _optuna_tuner(cfg: FinetuneConfig, launch: SweepLaunch, base: dict[str, Any]):
    """One Optuna search (TPE over the grid's values) with ASHA stopping for one task and site."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.sweep
    space = {
        "lr": tune.choice(list(s.scratch_lrs)),
        "weight_decay": tune.choice(list(s.scratch_weight_decays)),
        "epochs": tune.choice(list(s.scratch_epochs)),
        "optimizer": tune.choice(list(s.scratch_optimizers)),
        "run": base,
    }
    asha = ASHAScheduler(
        time_attr="epoch",
        max_t=max(s.scratch_epochs),
        grace_period=s.asha_grace_epochs,
        reduction_factor=s.asha_reduction,
    )
    name = f"scratch-optuna-{base['task']}-{base['site']}"
    return build_tuner(
        cfg,
        launch,
        space,
        name=name,
        search_alg=OptunaSearch(seed=0),
        scheduler=asha,
        num_samples=s.optuna_trials,
    )


# -- the probe suite (issue 12) --------------------------------------------------------------------
def _view_masks(launch: SweepLaunch, frame: pd.DataFrame, name: str, view) -> dict:
    """Mask `name` of each scan of `frame` that has one, cut to the evaluation view."""
    from fmct_ray.downstream.suite import view_labels
    from fmct_ray.ingest import SiteStore

    stores = {site: SiteStore(uri) for site, uri in launch.stores.items()}
    out = {}
    for row in frame[["scan_id", "site"]].itertuples():
        if row.site not in stores:
            raise ValueError(f"mask task: no store given for site {row.site!r} (--stores)")
        try:
            out[row.scan_id] = view_labels(stores[row.site].read_mask(row.scan_id, name), view)
        except FileNotFoundError:
            continue  # a scan without this mask: not labelled for the task
    return out


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def probe_trial(config: dict[str, Any], cfg, launch: SweepLaunch) -> None:
    """One trial of the probe suite: fit on the run's site with the run's model's embeddings,
    report the validation metric (`val`), score every site's test split, and write under
    `<storage>/<study>/`: `probes/<run key>.parquet` (one row of metrics per evaluated site),
    `probe_predictions/<run key>.parquet` (per scan, `suite.prediction_rows`: the report's
    input) and, for a mask task, each test scan's predicted labels as NIfTI in its world frame,
    `segmentations/<run key>/<scan_id>.nii.gz`."""
    from ray import tune

    from fmct_ray.downstream.suite import (
        fit_probe_for,
        labelled,
        prediction_nifti,
        prediction_rows,
        score,
        suite_key,
        validation_value,
    )
    from fmct_ray.ingest import SiteStore

    run = config["run"]
    spec = next(t for t in cfg.tasks if t.name == run["task"])
    table = load_table(launch.labels, launch.suite_models[run["model"]], launch.storage)
    masks = _view_masks(launch, table, spec.columns[0], cfg.view) if spec.kind == "mask" else None
    site = table[table["site"] == run["site"]]
    train, val = (labelled(spec, site[site["split"] == s], masks) for s in ("train", "val"))
    predict, val_value = None, 0.0
    if run["probe"] != "retrieval":
        probe_cfg = dataclasses.replace(cfg.probe, lr=run["lr"], seed=run["seed"])
        predict = fit_probe_for(spec, run["probe"], train, val, cfg.view, masks, probe_cfg)
        val_value = validation_value(spec, score(spec, val, predict(val), masks, train))
    fs, root = filesystem(launch.experiment_uri, launch.storage)
    key, rows, preds = suite_key(run), [], []
    meta = {**run, "kind": spec.kind, "val": val_value, "key": key}
    if spec.kind == "mask":
        meta["mask_name"] = spec.columns[0]
    for eval_site, group in table[table["split"] == "test"].groupby("site"):
        test = labelled(spec, group, masks)
        pred = None if predict is None else predict(test)
        rows.append({**meta, "eval_site": eval_site, "n": len(test), **score(spec, test, pred, masks, train)})
        preds.append(prediction_rows(spec, test, pred, masks).assign(**meta, eval_site=eval_site))
        if spec.kind == "mask":
            store = SiteStore(launch.stores[eval_site], launch.storage)
            for scan_id, labels in zip(test["scan_id"], pred, strict=True):
                nifti = prediction_nifti(labels, cfg.view, store.affine(scan_id, spec.columns[0]))
                atomic_write(fs, join(root, "segmentations", key, f"{scan_id}.nii.gz"), nifti)
    atomic_write(fs, join(root, "probe_predictions", key + ".parquet"), _parquet(pd.concat(preds)))
    atomic_write(fs, join(root, "probes", key + ".parquet"), _parquet(pd.DataFrame(rows)))
    tune.report({"val": val_value})


def run_probe_sweep(cfg, launch: SweepLaunch) -> pd.DataFrame:
    """The probe suite's matrix (`fmct_ray.downstream.suite.SuiteConfig`) as one Tune experiment
    named "probes"; returns Tune's results table (the metrics: `probe_results`)."""
    from ray import tune

    from fmct_ray.downstream.suite import suite_runs

    if not launch.suite_models:
        raise ValueError("the probe suite needs embeddings (--embeddings [MODEL=]URI ...)")
    labels = pd.read_parquet(launch.labels, columns=["site"])
    runs = suite_runs(cfg, list(cfg.sites) or sorted(labels["site"].unique()), list(launch.suite_models))
    return _fit(
        build_tuner(cfg, launch, {"run": tune.grid_search(runs)}, "probes", fn=probe_trial, metric="val")
    )


def probe_results(launch: SweepLaunch) -> pd.DataFrame:
    """Every probe-suite trial's rows (`probe_trial`): run, evaluated site, its metrics."""
    fs, root = filesystem(launch.experiment_uri, launch.storage)
    files = sorted(fs.glob(join(root, "probes", "*.parquet")))
    frames = []
    for path in files:
        with fs.open(path, "rb") as f:
            frames.append(pd.read_parquet(f))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
