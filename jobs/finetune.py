r"""The fine-tuning matrix on Ray Tune: tasks x sites x modes x K x seeds, with external validation.

    # 1. cache frozen-backbone embeddings (Ray Data actor pool, GPU when present)
    python jobs/finetune.py embed --config configs/finetune/fmct_vitb.yaml \
        --set backbone.path=runs/dino/teacher_backbone.pt --stores A=s3://bucket/siteA B=s3://bucket/siteB \
        --out s3://bucket/study/embeddings.parquet --actors 4 --gpus-per-actor 1
    # 2. the sweep (probes on cached embeddings; full fine-tuning reads the stores)
    python jobs/finetune.py sweep --config configs/finetune/fmct_vitb.yaml --name study \
        --storage s3://bucket/studies --labels labels.parquet \
        --embeddings s3://bucket/study/embeddings.parquet \
        --stores A=s3://bucket/siteA B=s3://bucket/siteB --cpus-per-trial 0.25 --gpus-per-trial 0

    # 3. the probe suite beyond classification (regression, survival, retrieval, localisation,
    #    segmentation; typed targets in the label table, masks in the stores)
    python jobs/finetune.py suite --config configs/suite/synthetic.yaml --name study \
        --storage runs --labels labels.parquet --embeddings embeddings.parquet --stores s=store

Running the same sweep or suite command again resumes it (finished trials are not re-run). Each
stage takes its own flags: `python jobs/finetune.py embed --help`, `... sweep --help`, `... suite --help`.
"""

import argparse

from fmct_ray.cli import add_config_args, add_store_args, load_config, sites_from_args
from fmct_ray.data.embed import EmbedConfig, extract_embeddings
from fmct_ray.downstream.config import FinetuneConfig
from fmct_ray.downstream.suite import SuiteConfig
from fmct_ray.downstream.sweep_cli import add_launch_args, launch_from_args
from fmct_ray.downstream.tune import probe_results, run_finetune_sweep, run_probe_sweep

EMBED = "Embed every train/val/test scan of the site stores with the recipe's backbone and view."
SWEEP = "The fine-tuning matrix; the same --name and --storage again resume it."
SUITE = "The probe suite's matrix (SuiteConfig); the same --name and --storage again resume it."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", required=True, metavar="{embed,sweep,suite}")

    embed = stages.add_parser(
        "embed", help="cache frozen-backbone embeddings (Ray Data actor pool) -> Parquet", description=EMBED
    )
    add_config_args(embed)
    add_store_args(embed, required=True)
    embed.add_argument("--out", required=True, help="output Parquet file (local or s3://)")
    embed.add_argument("--actors", type=int, default=1, help="actor pool size")
    embed.add_argument("--gpus-per-actor", type=float, default=0.0, help="0 on CPU clusters")
    embed.add_argument("--tokens", action="store_true", help="also keep all tokens (attentive probes)")

    sweep = stages.add_parser(
        "sweep", help="Ray Tune: tasks x sites x modes x K x seeds, external validation", description=SWEEP
    )
    add_config_args(sweep)
    add_launch_args(sweep)

    suite = stages.add_parser(
        "suite", help="Ray Tune: tasks of every category x probes x sites x seeds x lrs", description=SUITE
    )
    add_config_args(suite)
    add_launch_args(suite)

    args = p.parse_args()
    if args.stage == "suite":
        launch = launch_from_args(args)
        run_probe_sweep(load_config(SuiteConfig, args), launch)
        results = probe_results(launch)
        print(results.drop(columns=["seed"]).to_string(index=False))
        return
    cfg = load_config(FinetuneConfig, args)
    if args.stage == "embed":
        ecfg = EmbedConfig(
            backbone=cfg.backbone,
            view=cfg.view,
            tokens=args.tokens,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
        )
        print(f"embedded {extract_embeddings(ecfg, sites_from_args(args), args.out)} scans -> {args.out}")
        return
    launch = launch_from_args(args)
    if len(launch.models) > 1:
        p.error("the fine-tuning sweep takes one --embeddings file (several are for the probe suite)")
    frame = run_finetune_sweep(cfg, launch)
    print(frame.filter(regex="run/|val_auroc").to_string(index=False))


if __name__ == "__main__":
    main()
