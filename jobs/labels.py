"""Derive per-scan task labels for one or several site stores (SPEC section 4).

From health records (the manifest has no scan time yet, so scan times come as a table):
    python jobs/labels.py --config configs/labels/ehr_tasks.yaml --stores A=s3://bucket/siteA \
        --ehr ehr.parquet --scan-times scan_times.csv --out labels/siteA
From a public-dataset label file (one row per scan, one column per task):
    python jobs/labels.py --config configs/labels/rsna.yaml --stores R=/data/rsna \
        --public rsna_labels.csv --out labels/rsna

Writes labels.parquet and label_report.{csv,md}; missing or contradictory labels are counted per
task in the report, never turned into negatives.
"""

import argparse

import pandas as pd

from fmct_ray.cli import load_config, parser
from fmct_ray.eval.labels import LabelConfig, make_labels
from fmct_ray.ingest import SiteStore


def main() -> None:
    p = parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--stores", nargs="+", required=True, metavar="SITE=URI", help="site stores")
    p.add_argument("--ehr", help="EHR table (CSV/Parquet): patient_id, time, code[, kind]")
    p.add_argument("--scan-times", help="scan times table (CSV/Parquet): scan_id, scan_time")
    p.add_argument("--public", help="label file (CSV/Parquet): one row per scan, one column per task")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args()
    cfg = load_config(LabelConfig, args)
    manifest = pd.concat([SiteStore(s.split("=", 1)[-1]).manifest() for s in args.stores], ignore_index=True)
    _, table = make_labels(
        cfg, manifest, args.out, ehr=args.ehr, scan_times=args.scan_times, public=args.public
    )
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
