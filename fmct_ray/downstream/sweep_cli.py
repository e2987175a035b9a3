"""Command-line plumbing shared by jobs/finetune.py and jobs/sweep_scratch.py."""

from __future__ import annotations

import argparse

from fmct_ray.cli import add_store_args, sites_from_args
from fmct_ray.downstream.tune import SweepLaunch
from fmct_ray.storage import absolute


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="study name (the same name resumes the sweep)")
    p.add_argument("--storage", required=True, help="local folder or s3://bucket/prefix for results")
    p.add_argument("--labels", required=True, help="labels.parquet from jobs/labels.py")
    p.add_argument(
        "--embeddings",
        nargs="+",
        metavar="[MODEL=]URI",
        help="embeddings Parquet (fast path of the frozen modes); the probe suite takes one per "
        "model to compare (e.g. dino=emb_dino.parquet random=emb_random.parquet)",
    )
    add_store_args(p, sites_file=True)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")


def _models(values: list[str] | None) -> dict[str, str]:
    """`[MODEL=]URI` values -> model name -> URI ("model" for a bare URI)."""
    models = {}
    for value in values or []:
        name, sep, uri = value.partition("=")
        name, uri = (name, uri) if sep and "/" not in name and ":" not in name else ("model", value)
        if name in models:
            raise SystemExit(f"--embeddings: model {name!r} given twice (name each file: MODEL=URI)")
        models[name] = absolute(uri)
    return models


def launch_from_args(args: argparse.Namespace) -> SweepLaunch:
    sites = sites_from_args(args)
    models = _models(args.embeddings)
    return SweepLaunch(
        name=args.name,
        storage_path=absolute(args.storage),
        labels=absolute(args.labels),
        embeddings=next(iter(models.values()), None),
        models=models,
        stores={s.name: s.uri for s in sites},
        resources={s.name: s.resource for s in sites if s.resource},
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
    )
