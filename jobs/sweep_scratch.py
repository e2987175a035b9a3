"""The scratch baseline on Ray Tune: randomly initialised ViTs per task and site, over the SPEC grid
(lr x weight decay x epochs x optimiser = 144 configurations) or Optuna + ASHA (`sweep.search=optuna`).

    python jobs/sweep_scratch.py --config configs/finetune/scratch_vitb.yaml --name study \
        --storage s3://bucket/studies --labels labels.parquet \
        --stores A=s3://bucket/siteA B=s3://bucket/siteB --gpus-per-trial 1 \
        [--set sweep.search=optuna --set sweep.optuna_trials=24]

Use the study name of jobs/finetune.py so that the report compares against this baseline.
Running the same command again resumes the sweep.
"""

import argparse

from fmct_ray.cli import load_config, parser
from fmct_ray.downstream.config import FinetuneConfig
from fmct_ray.downstream.sweep_cli import add_launch_args, launch_from_args
from fmct_ray.downstream.tune import run_scratch_sweep


def main() -> None:
    p = parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_launch_args(p)
    args = p.parse_args()
    frame = run_scratch_sweep(load_config(FinetuneConfig, args), launch_from_args(args))
    print(frame.filter(regex="run/|^lr|weight_decay|epochs|optimizer|val_auroc").to_string(index=False))


if __name__ == "__main__":
    main()
