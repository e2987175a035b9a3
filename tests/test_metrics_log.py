"""Run logs (fmct_ray.train.metrics): TensorBoard scalars, the run folder's copy, the progress line."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmct_ray.train.metrics import RunLog, TBLog, echo, print_progress


def row(step: int, **extra) -> dict:
    return {
        "step": step,
        "epoch": step / 4,
        "samples": 8 * step,
        "loss": 10.0 - step,
        "lr": 1e-3 * step,
        "scans_per_s": 3.5,
        "data_wait_frac": 0.1,
        "peak_mem_gb": 1.0,
        "time": 1_700_000_000.0 + step,
        **extra,
    }


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tblog_writes_every_numeric_key_at_its_step(tmp_path):
    log = TBLog(tmp_path / "tb")
    for step in (1, 2, 3):
        log.write(row(step, note="text", nan=float("nan")))
    # flushed after every row: readable before close
    got = scalars(tmp_path / "tb")
    assert "step" not in got and "time" not in got and "note" not in got
    assert {"epoch", "samples", "loss", "lr", "scans_per_s", "data_wait_frac", "peak_mem_gb"} <= set(got)
    assert got["loss"] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert [s for s, _ in got["lr"]] == [1, 2, 3] and got["lr"][2][1] == pytest.approx(3e-3)
    assert all(math.isnan(v) for _, v in got["nan"])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert acc.Scalars("loss")[0].wall_time == pytest.approx(1_700_000_001.0)
    log.close()


def test_tblog_resumed_run_hides_steps_past_the_checkpoint(tmp_path):
    first = TBLog(tmp_path)
    for step in range(1, 7):  # crashed after step 6; the last checkpoint was at step 4
        first.write(row(step))
    first.close()
    resumed = TBLog(tmp_path, purge_step=5)
    for step in (5, 6, 7):
        resumed.write(row(step, loss=100.0 + step))
    resumed.close()
    kept = [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert scalars(tmp_path)["loss"] == kept + [(5, 105.0), (6, 106.0), (7, 107.0)]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_runlog_mirrors_csv_and_events_into_the_run_folder(tmp_path):
    run = tmp_path / "storage" / "my-run"
    log = RunLog(str(run))
    for step in (1, 2):
        log.write(row(step))
    assert [r["step"] for r in read_csv(run / "metrics.csv")] == ["1", "2"]
    assert scalars(run / "tensorboard")["loss"] == [(1, 9.0), (2, 8.0)]
    log.close()

    # Resume from a checkpoint at step 1 (its metrics.csv holds row 1): the run folder's CSV is
    # replaced by that history plus the new rows; TensorBoard hides the first attempt's step 2.
    checkpoint_csv = tmp_path / "checkpoint_metrics.csv"
    checkpoint_csv.write_text("".join((run / "metrics.csv").read_text().splitlines(True)[:2]))
    again = RunLog(str(run), resume_step=1, history=checkpoint_csv)
    assert again.csv_path.parent != log.csv_path.parent  # a fresh local folder per start
    again.write(row(2, loss=50.0))
    rows = read_csv(run / "metrics.csv")
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "9.0"), ("2", "50.0")]
    assert scalars(run / "tensorboard")["loss"] == [(1, 9.0), (2, 50.0)]
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per start
    again.close()


def test_runlog_fresh_start_does_not_append_to_an_old_file(tmp_path):
    for _ in range(2):
        log = RunLog()
        log.write(row(1))
        assert len(read_csv(log.csv_path)) == 1
        log.close()


def test_progress_goes_to_stdout_once_without_print(capsys, monkeypatch):
    # Ray Train's workers patch builtins.print; the progress line must not go through it
    monkeypatch.setattr("builtins.print", lambda *a, **k: pytest.fail("print was called"))
    print_progress(row(3), 10)
    echo("hello")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("[step 3/10") and out[1] == "hello"


def test_runlog_mirrors_into_an_s3_run_folder(s3, tmp_path):
    """The filesystem Ray Train's storage context holds for s3:// runs (checkpoint.storage_filesystem)."""
    from fmct_ray.storage import StorageConfig
    from fmct_ray.train.checkpoint import storage_filesystem

    s3.filesystem().mkdir("metrics-runs")
    path, fs = storage_filesystem("s3://metrics-runs/prefix", StorageConfig(endpoint_url=s3.endpoint))
    log = RunLog(f"{path}/my-run", fs)
    log.write(row(1))
    log.write(row(2))
    log.close()
    local = tmp_path / "copy"
    s3.filesystem().get("metrics-runs/prefix/my-run", str(local), recursive=True)
    assert [r["step"] for r in read_csv(local / "metrics.csv")] == ["1", "2"]
    assert scalars(local / "tensorboard")["loss"] == [(1, 9.0), (2, 8.0)]
