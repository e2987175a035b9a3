"""Training metrics: a step timer (data wait vs compute), a CSV log, TensorBoard scalars and a
console progress line.

`RunLog` is what rank 0 writes: metrics.csv (one row per logged step, a fixed set of columns) and
TensorBoard event files (`TBLog`), in a fresh local folder copied after every row into the run's
own folder in storage (Ray Train's <storage_path>/<name>/), so `tensorboard --logdir <run>` shows
the curves. metrics.csv also travels inside every checkpoint: a resumed run starts from the
checkpoint's history, and its event files hide what a crashed attempt logged past that checkpoint.
"""

from __future__ import annotations

import csv
import numbers
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

COLUMNS = (
    "step",
    "epoch",
    "samples",
    "loss",
    "dino",
    "ibot",
    "koleo",
    "mae",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "grad_norm",
    "scans_per_s",
    "data_wait_frac",
    "step_s",
    "peak_mem_gb",
    "time",
    "teacher_entropy",
    "teacher_marginal_entropy",
    "student_cls_std",
    "teacher_cls_std",
    "log_k",
)


class StepTimer:
    """Accumulates, over a logging window, wall time per step and the part spent waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def step(self) -> None:
        self.steps += 1

    def summary(self, global_batch: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "scans_per_s": global_batch * self.steps / elapsed,
            "data_wait_frac": self.wait / elapsed,
            "step_s": elapsed / max(self.steps, 1),
        }


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 2**20


class CSVLog:
    """Append rows of `COLUMNS` to `path` (header written once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, float]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in COLUMNS})


class TBLog:
    """TensorBoard scalars of the rows CSVLog writes: every numeric key but "step" and "time" at
    global step row["step"] (wall time row["time"] when present), flushed after each row.

    `purge_step`: a resumed run's first new step; TensorBoard then hides the events at or after it
    in the folder's older event files (what an attempt logged past the checkpoint it resumes).
    """

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(self.logdir), purge_step=purge_step)

    def write(self, row: dict[str, float]) -> None:
        step, walltime = int(row["step"]), row.get("time")
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, numbers.Real):
                self.writer.add_scalar(key, float(value), step, walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """metrics.csv and TensorBoard events of one run (rank 0), in a fresh local folder copied after
    every row into `run_path` on `filesystem` (a pyarrow filesystem; None: inferred from the path),
    the run's folder: `ray.train.get_context().get_storage()` gives `experiment_fs_path` and
    `storage_filesystem`. `run_path=None` keeps the files local (tests).

    A resumed run passes the checkpoint's metrics.csv as `history` and its step as `resume_step`.
    """

    def __init__(
        self,
        run_path: str | None = None,
        filesystem=None,
        resume_step: int = 0,
        history: str | Path | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fmct_metrics_"))
        if history is not None and Path(history).exists():
            shutil.copyfile(history, self.dir / "metrics.csv")
        self.csv = CSVLog(self.dir / "metrics.csv")
        self.tb = TBLog(self.dir / "tensorboard", purge_step=resume_step + 1 if resume_step else None)
        self.run_path, self.filesystem = run_path, filesystem

    @property
    def csv_path(self) -> Path:
        return self.csv.path

    def write(self, row: dict[str, float]) -> None:
        self.csv.write(row)
        self.tb.write(row)
        self.sync()

    def sync(self) -> None:
        """Copy the folder into the run's folder (new event files added, metrics.csv replaced)."""
        if self.run_path is None:
            return
        import pyarrow.fs

        pyarrow.fs.copy_files(
            str(self.dir),
            self.run_path,
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )

    def close(self) -> None:
        """Flush and close the events; a log mirrored into a run folder also drops its local copy."""
        self.tb.close()
        if self.run_path is not None:
            self.sync()
            shutil.rmtree(self.dir, ignore_errors=True)


def progress_line(row: dict[str, float], total_steps: int) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "dino", "ibot", "koleo", "mae") if k in row)
    if "teacher_entropy" in row:  # DINO: collapse shows here (marginal -> 0 or entropy -> log K)
        terms += (
            f" | teacher entropy {row['teacher_entropy']:.3f} marginal "
            f"{row['teacher_marginal_entropy']:.3f} (log K {row['log_k']:.2f})"
        )
    return (
        f"[step {int(row['step'])}/{total_steps} ep {row['epoch']:.2f}] {terms} lr {row['lr']:.2e} "
        f"| {row['scans_per_s']:.1f} scans/s, data wait {100 * row['data_wait_frac']:.0f}%, "
        f"peak {row['peak_mem_gb']:.2f} GB"
    )


def echo(line: str) -> None:
    """Write a line to stdout once. Not `print`: in a Ray Train 2.60 worker `print` is patched to
    log the line (root logger -> stderr) and, because every Ray worker replaces sys.stdout, also to
    echo it to stdout, so a printed line reached the job's log twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def print_progress(row: dict[str, float], total_steps: int) -> None:
    echo(progress_line(row, total_steps))
