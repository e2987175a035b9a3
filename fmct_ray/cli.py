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


def load_config(cls: type[T], args: argparse.Namespace) -> T:
    try:
        return config_lib.load(cls, args.config, args.overrides)
    except config_lib.ConfigError as err:
        sys.exit(f"config error: {err}")
