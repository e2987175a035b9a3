"""Derive per-scan task labels for one or several site stores (SPEC section 4).

From health records and the manifest's scan times (stored date-shifted per patient by ingest; the
EHR times are shifted the same way, with the site secret in $FMCT_SITE_SECRET, LabelConfig.secret_env):
    python jobs/labels.py --config configs/labels/ehr_tasks.yaml --stores A=s3://bucket/siteA \
        --ehr ehr.parquet --out labels/siteA
    [--scan-times scan_times.csv]   # real (unshifted) times overriding the manifest's, e.g. for
                                    # NIfTI-only stores, which have none
From a public dataset's label file as published (RSNA 2019: per-slice rows joined through the
slices' SOP instance ids; CQ500: three readers' reads per patient, onto each study's primary series):
    python jobs/labels.py --config configs/labels/rsna2019.yaml --stores R=/data/rsna-store \
        --public stage_2_train.csv --out labels/rsna2019
    python jobs/labels.py --config configs/labels/cq500.yaml --stores C=/data/cq500-store \
        --public reads.csv --out labels/cq500

The stores of one run share the site secret (a store shifted with another secret is an error).
A site pinned to its nodes (`--sites FILE` with a `resource`) is labelled on one of them: its
manifest and the label source (a path readable there) are read there, and only pseudonymous label
rows and counts come back. Writes labels.parquet and label_report.{csv,md}; missing or
contradictory labels are counted per task (and per group of sites labelled together) in the
report, never turned into negatives.
"""

import argparse

from fmct_ray.cli import add_store_args, load_config, parser, sites_from_args
from fmct_ray.eval.labels import LabelConfig, site_labels


def main() -> None:
    p = parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_store_args(p, sites_file=True)
    p.add_argument("--ehr", help="EHR table (CSV/Parquet): patient_id, time, code[, kind]")
    p.add_argument(
        "--scan-times",
        help="optional scan times table (CSV/Parquet): scan_id, scan_time; real times that override "
        "the manifest's (for stores without times)",
    )
    p.add_argument("--public", help="label file (CSV/Parquet) in the layout the config names")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args()
    cfg = load_config(LabelConfig, args)
    sites = sites_from_args(args)
    if not sites:
        p.error("give the stores to label: --stores NAME=URI ... and/or --sites FILE")
    try:
        _, table = site_labels(
            cfg, sites, args.out, ehr=args.ehr, scan_times=args.scan_times, public=args.public
        )
    except ValueError as err:  # bad input tables: the message names the file and the reason
        raise SystemExit(f"labels: {err}") from err
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
