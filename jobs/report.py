"""Tables and figures of a downstream study (results.csv/.md, few-shot curves, AUROC bars,
external-validation matrices, optionally an attention-distance map of one scan).

    python jobs/report.py --results s3://b/studies/study --out report/ \
        [--attention-backbone teacher_backbone.pt --attention-store A=s3://b/siteA --attention-scan <scan_id>]
"""

import argparse

from fmct_ray.data.views import attention_input
from fmct_ray.eval.report import ReportConfig, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="<storage>/<study name> of the sweeps")
    p.add_argument("--out", required=True, help="local output folder")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (by patient)")
    p.add_argument("--permutations", type=int, default=1000, help="permutations of the test against scratch")
    p.add_argument("--attention-backbone", help="backbone file for the attention-distance map")
    p.add_argument("--attention-store", metavar="SITE=URI")
    p.add_argument("--attention-scan", help="scan id of the map")
    args = p.parse_args()
    attention = None
    if args.attention_backbone:
        attention = attention_input(
            args.attention_backbone, args.attention_store.split("=", 1)[-1], args.attention_scan
        )
    written = write_report(
        args.results, args.out, ReportConfig(args.resamples, args.permutations), attention=attention
    )
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
