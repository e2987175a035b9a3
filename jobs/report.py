"""Tables and figures of a downstream study: the fine-tuning sweep's (results.csv/.md, few-shot
curves, AUROC bars, external-validation matrices, optionally an attention-distance map of one
scan) and the probe suite's (suite.md/.csv: one section per task category, p-values against a
reference model, a figure per task), whichever the study has.

    python jobs/report.py --results s3://bucket/studies/study --out report/ \
        [--attention-backbone teacher_backbone.pt --attention-store A=s3://bucket/siteA \
         --attention-scan <scan_id>]
    python jobs/report.py --results runs/study --out report/ --stores s=store [--reference random]
"""

import argparse

from fmct_ray.cli import add_store_args, sites_from_args
from fmct_ray.data.views import attention_input
from fmct_ray.eval.report import NoResults, ReportConfig, write_report
from fmct_ray.eval.suite_report import write_suite_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="<storage>/<study name> of the sweeps")
    p.add_argument("--out", required=True, help="local output folder")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (by patient)")
    p.add_argument("--permutations", type=int, default=1000, help="permutations of the paired tests")
    p.add_argument("--attention-backbone", help="backbone file for the attention-distance map")
    p.add_argument("--attention-store", metavar="SITE=URI")
    p.add_argument("--attention-scan", help="scan id of the map")
    p.add_argument("--reference", help="probe suite: the model the others are tested against")
    add_store_args(p)  # probe suite: the stores of the segmentation overlay
    args = p.parse_args()
    cfg, written, missing = ReportConfig(args.resamples, args.permutations), {}, []
    attention = None
    if args.attention_backbone:
        attention = attention_input(
            args.attention_backbone, args.attention_store.split("=", 1)[-1], args.attention_scan
        )
    stores = {s.name: s.uri for s in sites_from_args(args)}
    for write in (
        lambda: write_report(args.results, args.out, cfg, attention=attention),
        lambda: write_suite_report(args.results, args.out, cfg, reference=args.reference, stores=stores),
    ):
        try:
            written.update(write())
        except NoResults as err:  # this study has no such results
            missing.append(str(err))
    if not written:
        raise SystemExit("report: " + "; ".join(missing))
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
