"""Derive per-scan task labels for one or several site stores (SPEC section 4).

From health records and the manifest's scan times (stored date-shifted per patient by ingest; the
EHR times are shifted the same way, with the site secret in $FMCT_SITE_SECRET, LabelConfig.secret_env):
    python jobs/labels.py --config configs/labels/ehr_tasks.yaml --stores A=s3://bucket/siteA \
        --ehr ehr.parquet --out labels/siteA
    [--scan-times scan_times.csv]   # real (unshifted) times overriding the manifest's, e.g. for
                                    # NIfTI-only stores, which have none
From a public-dataset label file (one row per scan, one column per task):
    python jobs/labels.py --config configs/labels/rsna.yaml --stores R=/data/rsna \
        --public rsna_labels.csv --out labels/rsna

The stores of one run share the site secret (a store shifted with another secret is an error).
Writes labels.parquet and label_report.{csv,md}; missing or contradictory labels are counted per
task in the report, never turned into negatives.
"""

import argparse

import pandas as pd

from fmct_ray.cli import add_store_args, load_config, parser, sites_from_args
from fmct_ray.eval.labels import LabelConfig, make_labels
from fmct_ray.ingest import SiteStore


def main() -> None:
    p = parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_store_args(p, required=True)
    p.add_argument("--ehr", help="EHR table (CSV/Parquet): patient_id, time, code[, kind]")
    p.add_argument(
        "--scan-times",
        help="optional scan times table (CSV/Parquet): scan_id, scan_time; real times that override "
        "the manifest's (for stores without times)",
    )
    p.add_argument("--public", help="label file (CSV/Parquet): one row per scan, one column per task")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args()
    cfg = load_config(LabelConfig, args)
    sites = sites_from_args(args)
    manifest = pd.concat([SiteStore(s.uri, s.storage).manifest() for s in sites], ignore_index=True)
    try:
        _, table = make_labels(
            cfg, manifest, args.out, ehr=args.ehr, scan_times=args.scan_times, public=args.public
        )
    except ValueError as err:  # bad input tables: the message names the file and the reason
        raise SystemExit(f"labels: {err}") from err
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
