"""Training metrics: a step timer (data wait vs compute), a CSV log and a console progress line.

The CSV (one row per logged step, a fixed set of columns) is what users plot; it lives on the
worker's local disk and travels inside every checkpoint, so a resumed run keeps appending to the
full history.
"""

from __future__ import annotations

import csv
import resource
import sys
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


def progress_line(row: dict[str, float], total_steps: int) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "dino", "ibot", "koleo", "mae") if k in row)
    return (
        f"[step {int(row['step'])}/{total_steps} ep {row['epoch']:.2f}] {terms} lr {row['lr']:.2e} "
        f"| {row['scans_per_s']:.1f} scans/s, data wait {100 * row['data_wait_frac']:.0f}%, "
        f"peak {row['peak_mem_gb']:.2f} GB"
    )


def print_progress(row: dict[str, float], total_steps: int) -> None:
    print(progress_line(row, total_steps), file=sys.stdout, flush=True)
