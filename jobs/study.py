"""Does pretraining help? DINO and MAE backbones against random init, few-shot, on synthetic heads.

    python jobs/study.py --out study_out
    python jobs/study.py --out study_out --stages probe,report --set draws=3
    python jobs/study.py --out /tmp/s --set corpus_scans=16 --set pool_scans=24 --set test_scans=24 \
        --set 'overrides=[train.epochs=1]' --set 'shots=[2, 4]' --set draws=2 --set scratch_epochs=1

Stages (fmct_ray/study.py): data, pretrain (Ray Train, the CPU recipes), embed (Ray Data), probe,
report. The data stage keeps stores that exist; re-running pretrain with the same --out resumes
or reuses the runs. The report is
out/report/results.md with fewshot_curves.png and pretraining_curves.png.
"""

import os
from pathlib import Path

from fmct_ray.cli import load_config, parser
from fmct_ray.study import STAGES, StudyConfig, run
from fmct_ray.testing import LOOPBACK_RAY_ENV


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", default="study_out", help="folder for stores, runs, embeddings, report")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {list(STAGES)}")
    args = p.parse_args()
    os.environ.update(LOOPBACK_RAY_ENV)  # a local cluster stays on 127.0.0.1
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # progress lines once
    run(load_config(StudyConfig, args), Path(args.out), [s for s in args.stages.split(",") if s])


if __name__ == "__main__":
    main()
