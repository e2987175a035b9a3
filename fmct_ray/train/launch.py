"""Command line of the pretraining jobs: recipe + cluster shape + stores + storage -> `pretrain`."""

from __future__ import annotations

import argparse
import dataclasses
import os

from fmct_ray.cli import add_store_args, load_config, parser, sites_from_args
from fmct_ray.storage import StorageConfig
from fmct_ray.train.pretrain import PretrainConfig
from fmct_ray.train.trainer import LaunchConfig, pretrain


def job_parser(doc: str) -> argparse.ArgumentParser:
    p = parser(doc)
    add_store_args(p, sites_file=True)
    p.add_argument("--num-workers", type=int, default=1, help="training workers (min when elastic)")
    p.add_argument("--max-workers", type=int, help="elastic upper bound on training workers")
    p.add_argument("--gpu", "--use-gpu", dest="use_gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--storage", required=True, help="checkpoint storage: local folder or s3://bucket/prefix")
    p.add_argument("--name", required=True, help="run name; re-submitting the same name resumes")
    p.add_argument("--max-failures", type=int, default=3)
    return p


def recipe_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The recipe (--config, --set) with the sites of the command line, when it names any."""
    cfg = load_config(PretrainConfig, args)
    sites = sites_from_args(args) or cfg.data.sites
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sites=sites))


def run_job(objective: str, doc: str) -> None:
    args = job_parser(doc).parse_args()
    cfg = recipe_from_args(args)
    if cfg.objective != objective:
        raise SystemExit(f"recipe objective is {cfg.objective!r}; this job trains {objective!r}")
    launch = LaunchConfig(
        name=args.name,
        storage_path=args.storage,
        num_workers=args.num_workers,
        max_workers=args.max_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        storage=StorageConfig(),
    )
    # Ray Train 2.60 patches print() in its workers to log each line to the console too and, since
    # every Ray worker replaces sys.stdout, also to echo it: each printed line reached the job's
    # log twice. Ray hands this variable on to the controller and the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    result = pretrain(cfg, launch)
    print("final checkpoint:", result.checkpoint and result.checkpoint.path)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
