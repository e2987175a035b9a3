"""The fine-tuning matrix on Ray Tune: tasks x sites x modes x K x seeds, with external validation.

    # 1. cache frozen-backbone embeddings (Ray Data actor pool, GPU when present)
    python jobs/finetune.py embed --config configs/finetune/fmct_vitb.yaml \
        --set backbone.path=runs/dino/teacher_backbone.pt --stores A=s3://b/siteA B=s3://b/siteB \
        --out s3://b/study/embeddings.parquet --actors 4 --gpus-per-actor 1
    # 2. the sweep (probes on cached embeddings; full fine-tuning reads the stores)
    python jobs/finetune.py sweep --config configs/finetune/fmct_vitb.yaml --name study \
        --storage s3://b/studies --labels labels.parquet --embeddings s3://b/study/embeddings.parquet \
        --stores A=s3://b/siteA B=s3://b/siteB --cpus-per-trial 0.25 --gpus-per-trial 0

Running the same sweep command again resumes it (finished trials are not re-run).
"""

import argparse

from fmct_ray.cli import load_config, parser
from fmct_ray.data.embed import EmbedConfig, extract_embeddings
from fmct_ray.downstream.config import FinetuneConfig
from fmct_ray.downstream.sweep_cli import add_launch_args, launch_from_args, parse_stores
from fmct_ray.downstream.tune import run_finetune_sweep


def main() -> None:
    p = parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("stage", choices=["embed", "sweep"])
    add_launch_args(p)
    p.add_argument("--out", help="embed: output Parquet file")
    p.add_argument("--actors", type=int, default=1, help="embed: actor pool size")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--tokens", action="store_true", help="embed: also keep all tokens (attentive probes)")
    args = p.parse_args()
    cfg = load_config(FinetuneConfig, args)
    if args.stage == "embed":
        ecfg = EmbedConfig(
            backbone=cfg.backbone,
            view=cfg.view,
            tokens=args.tokens,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
        )
        print(f"embedded {extract_embeddings(ecfg, parse_stores(args.stores), args.out)} scans -> {args.out}")
        return
    frame = run_finetune_sweep(cfg, launch_from_args(args))
    print(frame.filter(regex="run/|val_auroc").to_string(index=False))


if __name__ == "__main__":
    main()
