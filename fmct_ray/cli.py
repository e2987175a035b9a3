"""Shared command-line plumbing of the jobs: `--config FILE` and repeated `--set key=value`."""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

from fmct_ray import config as config_lib

T = TypeVar("T")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    add_config_args(p)
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and repeated `--set key=value` (also on a job's subcommands)."""
    p.add_argument("--config", help="YAML file over the defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set preprocess.order=3 (repeatable)",
    )


def add_store_args(p: argparse.ArgumentParser, sites_file: bool = False, required: bool = False) -> None:
    """`--stores NAME=URI ...` (and `--sites FILE` where a job takes a sites file)."""
    p.add_argument(
        "--stores",
        nargs="+" if required else "*",
        required=required,
        default=[],
        metavar="NAME=URI",
        help="site stores (local folders or s3:// URIs); credentials from the environment",
    )
    if sites_file:
        p.add_argument(
            "--sites", help="sites file (configs/sites/*.yaml): name, uri, storage, weight, resource"
        )


def sites_from_args(args: argparse.Namespace):
    """The `SiteSpec`s of `--stores` and `--sites` (`fmct_ray.sites.job_sites`); exits naming the
    item and the reason when they are wrong."""
    from fmct_ray.sites import job_sites

    try:
        return job_sites(args.stores, getattr(args, "sites", None))
    except ValueError as err:
        sys.exit(f"sites: {err}")


def load_config(cls: type[T], args: argparse.Namespace) -> T:
    try:
        return config_lib.load(cls, args.config, args.overrides)
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {err}")
