"""The README's main command: the whole pipeline end to end on a local CPU Ray cluster.

python jobs/demo.py [--out demo_out] [--stages ingest,inspect]
"""

import argparse
import os
from pathlib import Path

from fmct_ray.demo import STAGES, run
from fmct_ray.testing import LOOPBACK_RAY_ENV


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for stores, runs, reports")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}")
    args = p.parse_args()
    os.environ.update(LOOPBACK_RAY_ENV)  # the demo's local cluster stays on 127.0.0.1
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # summaries are printed instead
    run(Path(args.out), [s for s in args.stages.split(",") if s])


if __name__ == "__main__":
    main()
