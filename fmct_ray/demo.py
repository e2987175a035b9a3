"""The end-to-end demo behind `make demo`: every stage on a laptop-sized local Ray cluster.

Stages (each can run alone with `--stages`):
  ingest   real scans from ../shared/data/real plus generated head-like volumes with planted
           findings -> two local site stores (site_a: real + synthetic, site_b: synthetic)
  inspect  manifests, quarantine tables, and a picture of a stored real volume
  pretrain the study's data (an unlabelled corpus store and a labelled few-shot/test store of
           synthetic heads), then DINO (patch 8) and MAE (patch 4) with the CPU recipes (Ray Data +
           Ray Train, 2 workers)
  study    does pretraining help? embeddings by the DINO teacher, the MAE encoder and random init
           of each one's preset (Ray Data), few-shot linear probes on the same draws (DINO: CLS +
           mean token; MAE: the patch-token grid), the reports (fmct_ray.study)
  probe    labels of the ingested sites, embeddings with the DINO backbone, then a Ray Tune sweep:
           linear and attentive probes against scratch models, per site, with external validation
  suite    the probe suite (configs/suite/demo.yaml) on the DINO embeddings and on random init's:
           classification, retrieval, regression, survival, localisation and segmentation probes,
           one Ray Tune trial each, every site's test split scored
  report   AUROC [CI], AP, p-values vs scratch, few-shot curves, external-validation matrix,
           attention-distance map; the suite's section per category (metric [CI], p vs random
           init, a figure each); all in one folder"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from fmct_ray import config as config_lib
from fmct_ray import study
from fmct_ray.ingest import SiteStore
from fmct_ray.sites import SiteSpec
from fmct_ray.study import StudyConfig
from fmct_ray.synthetic import ingest_synthetic_sites

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
SITES = {"site_a": 40, "site_b": 40}  # synthetic scans per site


def stage_ingest(out: Path) -> None:
    os.environ.setdefault("FMCT_SITE_SECRET", "demo-secret-not-for-real-sites")
    real = out / "raw" / "site_a" / "real"
    if REAL.exists() and not real.exists():  # link, never copy, the real scans
        real.mkdir(parents=True)
        (real / "invesalius_0051").symlink_to(REAL / "invesalius_0051_dicom")
        (real / "template.nii.gz").symlink_to(REAL / "ichseg_template_1mm_hu_skullstripped.nii.gz")
    # a 2:1:1 split so that each small demo site has enough held-out scans (the default is 8:1:1)
    ingest_synthetic_sites(
        out, SITES, seed=100, ingest_overrides=["split_fractions=[0.5, 0.25, 0.25]"], masks=True
    )


def stage_inspect(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "figures").mkdir(parents=True, exist_ok=True)
    for site in SITES:
        store = SiteStore(str(out / "stores" / site))
        manifest, quarantine = store.manifest(), store.quarantine()
        print(f"\n== {site}: {len(manifest)} scans; split {manifest['split'].value_counts().to_dict()}")
        print(
            manifest[
                ["scan_id", "split", "source_format", "orig_orientation", "slice_thickness", "kvp"]
            ].to_string(index=False)
        )
        print(f"quarantined: {len(quarantine)}")
        for row in quarantine.itertuples():
            print(f"  {row.path}: {row.reason}")
        dicom = manifest[manifest["source_format"] == "dicom"]
        row = (dicom if len(dicom) else manifest).iloc[0]
        vol = store.read_volume(row.scan_id, verify=True)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        planes = [vol[112].T, vol[:, 112].T, vol[:, :, 100].T]
        for ax, plane, name in zip(axes, planes, ["sagittal (x=112)", "coronal (y=112)", "axial (z=100)"]):
            ax.imshow(np.clip((plane + 40) / 160, 0, 1), cmap="gray", origin="lower")
            ax.set_title(name)
            ax.axis("off")
        fig.suptitle(
            f"{site} {row.source_format} scan {row.scan_id[:8]}: stored 224^3 int16 RAS, window 40/160"
        )
        path = out / "figures" / f"{site}_stored_volume.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        print(f"picture of {row.scan_id}: {path}")


# Two studies on one set of stores (out/study): each backbone against random init of its own preset.
# The scratch baseline (minutes per task on 2 cores) is left to jobs/study.py.
STUDY = StudyConfig(objectives=("dino",), scratch_epochs=0)
MAE_STUDY = StudyConfig(
    objectives=("mae",), mae_recipe="configs/pretrain/cpu_mae_tiny_p4.yaml", features="grid", scratch_epochs=0
)


def _studies(out: Path):
    return [
        (STUDY, out / "study"),
        (dataclasses.replace(MAE_STUDY, data=str(out / "study")), out / "study_mae"),
    ]


def stage_pretrain(out: Path) -> None:
    """The study's stores, then DINO and MAE with the CPU recipes on its corpus."""
    for cfg, folder in _studies(out):
        study.run(cfg, folder, ["data", "pretrain"])


def stage_study(out: Path) -> None:
    for cfg, folder in _studies(out):
        study.run(cfg, folder, ["embed", "probe", "report"])


def _backbone(out: Path) -> Path:
    return study.backbone_path(out / "study", "dino")


def _launch(out: Path):
    from fmct_ray.downstream.tune import SweepLaunch

    return SweepLaunch(
        name="demo-study",
        storage_path=str(out / "runs"),
        labels=str(out / "labels" / "labels.parquet"),
        embeddings=str(out / "embeddings.parquet"),
        stores={site: str(out / "stores" / site) for site in SITES},
        cpus_per_trial=0.5,
    )


def stage_probe(out: Path) -> None:
    from fmct_ray.data.embed import EmbedConfig, extract_embeddings
    from fmct_ray.downstream.config import FinetuneConfig
    from fmct_ray.downstream.tune import run_finetune_sweep, run_scratch_sweep

    launch = _launch(out)
    ecfg = config_lib.load(
        EmbedConfig,
        None,
        [f"backbone.path={_backbone(out)}", "view.size=32", "tokens=true", "actors=2", "cpus_per_actor=0.5"],
    )
    n = extract_embeddings(ecfg, [SiteSpec(n, u) for n, u in launch.stores.items()], launch.embeddings)
    print(f"== embeddings of {n} scans: {launch.embeddings}")
    recipe = ROOT / "configs/finetune/debug_tiny.yaml"
    probes = run_finetune_sweep(config_lib.load(FinetuneConfig, recipe, ["sweep.shots=[0, 4]"]), launch)
    scratch = run_scratch_sweep(config_lib.load(FinetuneConfig, recipe, ["sweep.scratch_epochs=[2]"]), launch)
    print(f"== sweep: {len(probes)} probe runs, {len(scratch)} scratch runs in {launch.experiment_uri}")


def stage_suite(out: Path) -> None:
    """The probe suite on the probe stage's DINO embeddings and on random init of the same preset
    (embedded here, at the same view)."""
    from fmct_ray.data.embed import BackboneConfig, EmbedConfig, extract_embeddings
    from fmct_ray.downstream.suite import SuiteConfig
    from fmct_ray.downstream.tune import probe_results, run_probe_sweep

    launch = _suite_launch(out)
    cfg = config_lib.load(SuiteConfig, ROOT / "configs/suite/demo.yaml")
    random = study.backbones(STUDY, out / "study")["random0"]
    ecfg = EmbedConfig(
        backbone=BackboneConfig(**random), view=cfg.view, tokens=True, actors=2, cpus_per_actor=0.5
    )
    sites = [SiteSpec(n, u) for n, u in launch.stores.items()]
    print(f"== embeddings of random init: {extract_embeddings(ecfg, sites, launch.models['random'])} scans")
    run_probe_sweep(cfg, launch)
    results = probe_results(launch)
    print(f"== suite: {len(results)} rows (trial x evaluated site) in {launch.experiment_uri}/probes")


def _suite_launch(out: Path):
    launch = _launch(out)
    models = {"dino": launch.embeddings, "random": str(out / "embeddings_random.parquet")}
    return dataclasses.replace(launch, models=models)


def stage_report(out: Path) -> None:
    from fmct_ray.data.views import attention_input
    from fmct_ray.downstream.config import FinetuneConfig
    from fmct_ray.eval.report import NoResults, ReportConfig, write_report
    from fmct_ray.eval.suite_report import write_suite_report

    launch = _launch(out)
    view = config_lib.load(FinetuneConfig, ROOT / "configs/finetune/debug_tiny.yaml").view
    manifest = SiteStore(launch.stores["site_a"]).manifest()
    first = manifest.loc[manifest["source_format"] == "nifti", "scan_id"].iloc[0]  # a synthetic scan
    written = write_report(
        launch.experiment_uri,
        out / "report",
        ReportConfig(1000, 1000),
        attention=attention_input(str(_backbone(out)), launch.stores["site_a"], first, view),
    )
    print("\n" + written["results_md"].read_text())
    try:
        suite = write_suite_report(
            launch.experiment_uri,
            out / "report",
            ReportConfig(1000, 1000),
            reference="random",
            stores=launch.stores,
        )
        print("\n" + suite["suite_md"].read_text())
    except NoResults:  # the suite stage was left out
        print("== no probe-suite results (stage suite not run)")
    print(f"== report: {out / 'report'}")


STAGES = {
    "ingest": stage_ingest,
    "inspect": stage_inspect,
    "pretrain": stage_pretrain,
    "study": stage_study,
    "probe": stage_probe,
    "suite": stage_suite,
    "report": stage_report,
}


def run(out: Path, stages: list[str]) -> Path:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for i, name in enumerate(stages, 1):
        t0 = time.monotonic()
        print(f"\n[demo {i}/{len(stages)}] {name} ...", flush=True)
        STAGES[name](out)
        done, total = time.monotonic() - t0, time.monotonic() - start
        print(
            f"[demo {i}/{len(stages)}] {name} done in {done / 60:.1f} min ({total / 60:.1f} min so far)",
            flush=True,
        )
    print(f"\nDemo output: {out}")
    return out
