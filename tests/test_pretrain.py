"""Pretraining on Ray Train, in tiers: unit (no Ray); the per-worker loop under a module-scoped
2-CPU `ray.init` (checkpoints, export, exact stop-and-resume, 1x4 vs 2x2 parity); and `ray job
submit` of the jobs on a real local cluster against the loopback S3 server: DINO in the default
tier; MAE stopped and resubmitted, and a killed worker, marked slow."""

import csv
import json
import math
import os
import re
import signal
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fmct_ray import config as C
from fmct_ray.data.sampling import Shard, fold_consumed, skip_from_runs, skip_runs
from fmct_ray.models import load_backbone
from fmct_ray.objectives import Progress, entropies, scaled_lr
from fmct_ray.synthetic import write_store
from fmct_ray.train import checkpoint as ckpt
from fmct_ray.train.metrics import COLUMNS, StepTimer, progress_line
from fmct_ray.train.pretrain import (
    PretrainConfig,
    RunLength,
    build_task,
    collapse_warning,
    micro_batches,
    resolve,
    run_length,
    schedules,
    seed_everything_for,
    step_seeds,
    steps_left,
)

ROOT = Path(__file__).resolve().parents[1]
DINO = ROOT / "configs" / "pretrain" / "debug_dino_tiny.yaml"
MAE = ROOT / "configs" / "pretrain" / "debug_mae_tiny.yaml"


def recipe(path, store, *overrides):
    return C.load(PretrainConfig, path, [f"data.sites=[{{name: A, uri: '{store}'}}]", *overrides])


# -- unit ------------------------------------------------------------------------------------
def test_run_length_and_resolve():
    """The run is planned in samples: epochs x samples per epoch at any world size, or max_steps x
    the launch's global batch; epoch-valued task settings become sample counts."""
    cfg = C.load(
        PretrainConfig,
        DINO,
        ["train.freeze_last_layer_epochs=0.5", "train.teacher_temp_warmup_epochs=1.5"],
    )
    assert run_length(cfg, 10, world_size=2) == run_length(cfg, 10, world_size=5) == RunLength(10, 20)
    assert run_length(C.load(PretrainConfig, DINO, ["train.max_steps=3"]), 10, 4).total_samples == 3 * 2 * 4
    r = resolve(cfg, run_length(cfg, 10, 2))
    assert (r.dino.freeze_last_layer_samples, r.dino.warmup_teacher_temp_samples) == (5, 15)
    assert C.load(PretrainConfig, C.save(r, Path(os.environ.get("TMPDIR", "/tmp")) / "r.yaml")) == r


def planned(length: RunLength, samples: int, global_batch: int, steps: int | None = None) -> list[Progress]:
    """The `Progress` of each step the loop runs from `samples` consumed at `global_batch`
    (`train_loop_per_worker` / `run_steps`): all the steps to the planned total, or `steps`."""
    n = steps_left(samples, length.total_samples, global_batch) if steps is None else steps
    return [Progress(samples + (k + 1) * global_batch, length.total_samples) for k in range(n)]


def test_schedules_follow_samples_across_a_resize():
    """Stopped after 5 steps on 4 workers (global batch 8) and resumed on 2 (batch 4): the schedules
    continue from the samples consumed, at the sample points of a run on 2 workers all along, with
    no jump in lr progress; the lr itself is scaled by the global batch in use."""
    cfg = C.load(
        PretrainConfig,
        DINO,
        ["train.warmup_epochs=2", "train.teacher_temp_warmup_epochs=2", "dino.teacher_temp=0.07"],
    )
    length = RunLength(samples_per_epoch=40, total_samples=400)
    task = build_task(resolve(cfg, length))
    first, resumed = planned(length, 0, 8, steps=5), planned(length, 40, 4)
    assert len(resumed) == steps_left(40, 400, 4) == 90
    assert [p.samples for p in first + resumed] == [*range(8, 48, 8), *range(44, 404, 4)]
    assert resumed == planned(length, 0, 4)[10:]  # where the uninterrupted 2-worker run is

    def shape(p: Progress, global_batch: int) -> float:  # lr over its peak: the lr's progress
        return schedules(cfg, length, p, global_batch)["lr"] / scaled_lr(cfg.optim.lr, global_batch)

    curve = [shape(p, 8) for p in first] + [shape(p, 4) for p in resumed]
    slope = max(abs(b - a) for a, b in zip(curve, curve[1:]))
    assert slope <= 8 / 80 + 1e-12  # at most one 4-worker step of the 80-sample warm-up
    assert curve[4] == pytest.approx(0.5) and curve[5] == pytest.approx(0.55)  # the resize: no jump
    assert curve[-1] == cfg.optim.min_lr / scaled_lr(cfg.optim.lr, 4)
    peak = Progress(80, 400)  # the end of the warm-up: the peak lr follows the global batch in use
    assert schedules(cfg, length, peak, 4)["lr"] == scaled_lr(cfg.optim.lr, 4) == cfg.optim.lr * 4 / 256
    assert schedules(cfg, length, peak, 8)["lr"] == scaled_lr(cfg.optim.lr, 8)
    temps = [task.teacher_temp(p) for p in first + resumed]
    assert temps[4] == pytest.approx(0.04 + 0.03 * 40 / 80) and temps[5] == pytest.approx(
        0.04 + 0.03 * 44 / 80
    )


def test_an_elastic_run_ends_at_the_final_schedule_values():
    """Planned for 4 workers (max_steps x global batch 8 = 200 samples), run on 2 and resized to 3
    (global batch 6, which does not divide the rest): the loop plans the steps that reach the
    planned samples, and the last one runs at min_lr, final weight decay, momentum and temperature."""
    cfg = C.load(
        PretrainConfig,
        DINO,
        ["train.max_steps=25", "train.teacher_temp_warmup_epochs=1", "dino.teacher_temp=0.07"],
    )
    length = run_length(cfg, samples_per_epoch=40, world_size=4)
    assert length.total_samples == 200
    task = build_task(resolve(cfg, length))
    rest = planned(length, 84, 6)  # after 21 steps on 2 workers: ceil(116 / 6) = 20 steps
    assert len(rest) == 20 and rest[-2].samples < 200 <= rest[-1].samples < 200 + 6
    last = schedules(cfg, length, rest[-1], 6)
    assert (last["lr"], last["wd"]) == (cfg.optim.min_lr, cfg.optim.weight_decay_end)
    assert task.after_step(rest[-1]) == {"momentum": 1.0, "teacher_temp": 0.07}
    assert schedules(cfg, length, rest[-2], 6)["lr"] > cfg.optim.min_lr
    assert task.after_step(rest[-2])["momentum"] < 1.0
    exact = planned(length, 0, 4)  # on 2 workers from the start: 50 steps that end at 200 exactly
    assert len(exact) == 50 and exact[-1] == Progress(200, 200)
    assert schedules(cfg, length, exact[-1], 4)["lr"] == cfg.optim.min_lr


def test_step_seeds_are_independent_streams():
    """Drop-path, mask and augmentation streams of neighbouring micro-steps, steps and ranks (and
    of the three kinds) are all distinct: micro-step i no longer replays micro-step i + 1's."""
    seeds = [s for st in range(3) for r in range(3) for m in range(3) for s in step_seeds(0, st, r, m)]
    assert len(set(seeds)) == len(seeds) == 81 and all(0 <= s < 2**63 for s in seeds)
    assert step_seeds(0, 1, 2, 3) == step_seeds(0, 1, 2, 3) != step_seeds(1, 1, 2, 3)
    task = types.SimpleNamespace(mask_generator=torch.Generator())
    draws = []
    with torch.random.fork_rng():
        for micro in (0, 1):
            augment = seed_everything_for(task, step_seeds(0, 0, 0, micro))
            draws += [
                torch.rand(4),
                torch.rand(4, generator=task.mask_generator),
                torch.rand(4, generator=augment),
            ]
    assert len({tuple(d.tolist()) for d in draws}) == 6


def monitor_rows(probs: torch.Tensor, n: int = 5, cls_std: float = 0.1) -> list[dict]:
    entropy, marginal = entropies(probs)
    row = {
        "teacher_entropy": float(entropy),
        "teacher_marginal_entropy": float(marginal),
        "teacher_cls_std": cls_std,
        "log_k": math.log(probs.shape[1]),
    }
    return [dict(row) for _ in range(n)]


def test_collapse_warning_on_known_distributions():
    k = 128
    healthy = torch.softmax(4 * torch.randn(16, k, generator=torch.Generator().manual_seed(0)), -1)
    assert collapse_warning(monitor_rows(healthy)) is None
    same = torch.zeros(16, k)
    same[:, 7] = 1.0  # one prototype for everything: marginal entropy 0
    assert "marginal entropy" in collapse_warning(monitor_rows(same))
    assert collapse_warning(monitor_rows(same, n=4)) is None  # not yet 5 consecutive logged steps
    assert collapse_warning(monitor_rows(same, n=4) + monitor_rows(healthy, n=1)) is None
    assert collapse_warning(monitor_rows(healthy, n=3) + monitor_rows(same)) is not None
    uniform = torch.full((16, k), 1 / k)  # entropy log K
    assert "uniform" in collapse_warning(monitor_rows(uniform))
    assert "CLS std" in collapse_warning(monitor_rows(healthy, cls_std=1e-6))
    assert collapse_warning([{"loss": 1.0, "mae": 1.0}] * 5) is None  # MAE has no teacher


def test_progress_line_shows_loss_and_teacher_entropies():
    assert {
        "teacher_entropy",
        "teacher_marginal_entropy",
        "student_cls_std",
        "teacher_cls_std",
        "log_k",
    } <= set(COLUMNS)
    row = {"step": 3, "epoch": 0.5, "loss": 4.25, "dino": 4.25, "lr": 1e-4, "scans_per_s": 2.0}
    row.update(
        data_wait_frac=0.1, peak_mem_gb=1.0, teacher_entropy=2.5, teacher_marginal_entropy=4.0, log_k=4.852
    )
    line = progress_line(row, 10)
    assert "loss 4.2500" in line and "teacher entropy 2.500 marginal 4.000 (log K 4.85)" in line
    mae = {k: v for k, v in row.items() if "entropy" not in k and k != "log_k"}
    assert "teacher" not in progress_line(mae, 10)


def test_checkpoint_roundtrip(tmp_path):
    cfg = C.load(PretrainConfig, DINO)
    task = build_task(cfg)
    opt = torch.optim.AdamW(task.student.parameters())
    task.dino_loss.center.fill_(0.5)
    torch.manual_seed(7)
    ckpt.save(tmp_path, 0, task=task, optimizer=opt, state={"step": 3, "samples": 6}, cfg=cfg)
    expected = torch.rand(3)
    other = build_task(C.load(PretrainConfig, DINO, ["train.seed=1"]))
    state = ckpt.load(tmp_path, 0, other, torch.optim.AdamW(other.student.parameters()))
    assert state == {"step": 3, "samples": 6}
    assert torch.equal(other.dino_loss.center, task.dino_loss.center)
    for a, b in zip(other.state_dict().values(), task.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected)  # RNG state restored
    assert C.load(PretrainConfig, tmp_path / "config.yaml") == cfg


def damage(d: Path, how: str) -> None:
    """What interrupted writes and bad storage leave in a checkpoint folder."""
    if how == "file missing":
        (d / "optimizer.pt").unlink()
    elif how == "truncated":
        data = (d / "task.pt").read_bytes()
        (d / "task.pt").write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        data = bytearray((d / "task.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "task.pt").write_bytes(bytes(data))
    elif how == "no manifest":
        (d / "manifest_rank0.json").unlink()
    elif how == "a rank's manifest missing":
        (d / "manifest_rank1.json").unlink()
    elif how == "bad manifest":
        (d / "manifest_rank0.json").write_text('{"files": {"task.pt": ')


@pytest.mark.parametrize(
    "how, reason",
    [
        ("file missing", "optimizer.pt is missing"),
        ("truncated", "task.pt has"),
        ("flipped byte", "task.pt does not match its checksum"),
        ("no manifest", "manifest_rank0.json is missing"),
        ("a rank's manifest missing", "manifest_rank1.json is missing"),
        ("bad manifest", "manifest_rank0.json is not valid JSON"),
    ],
)
def test_verify_names_what_is_damaged(tmp_path, how, reason):
    cfg = C.load(PretrainConfig, DINO)
    task = build_task(cfg)
    opt = torch.optim.AdamW(task.student.parameters())
    ckpt.save(tmp_path, 0, task=task, optimizer=opt, state={"step": 1, "samples": 2}, cfg=cfg, world=2)
    assert ckpt.verify(tmp_path) == "manifest_rank1.json is missing (a write that did not finish)"
    ckpt.save(tmp_path, 1, world=2)  # the other rank's part (Ray merges the folders)
    assert ckpt.verify(tmp_path) is None
    damage(tmp_path, how)
    assert reason in ckpt.verify(tmp_path)


def test_no_checkpoint_before_the_first_one(tmp_path):
    assert ckpt.latest_checkpoint(str(tmp_path), "run") is None
    (tmp_path / "run").mkdir()
    assert ckpt.latest_checkpoint(str(tmp_path), "run") is None


def test_micro_batches_group_whole_steps():
    batches = [{"index": torch.tensor([2 * i, 2 * i + 1])} for i in range(5)]
    groups = list(micro_batches(batches, 2, timer=StepTimer()))
    assert [[int(b["index"][0]) for b in g] for g in groups] == [[0, 2], [4, 6]]  # the short tail is dropped


def shard_steps(start: int, world: int, per_rank: int, total: int) -> list[list[int]]:
    """Run samples of every optimiser step, gathered over the ranks' shards."""
    shards = [Shard(start, r, world, per_rank) for r in range(world)]
    steps = shards[0].rows(total) // per_rank
    rows = [s.global_index(np.arange(steps * per_rank)).reshape(steps, per_rank) for s in shards]
    return [sorted(np.concatenate([r[k] for r in rows]).tolist()) for k in range(steps)]


def test_shards_cover_each_step_exactly_at_any_world_size():
    """Step k takes the samples [kG, (k + 1) G) whatever the world size, so 1x4 and 2x2 see the same
    scans, and a group resized at a restart (elastic) continues from the resume position with
    neither gaps nor repeats; a tail shorter than a global batch is left out on every rank."""
    assert (
        shard_steps(0, 1, 4, 12)
        == shard_steps(0, 2, 2, 12)
        == [list(range(4 * k, 4 * k + 4)) for k in range(3)]
    )
    assert Shard(0, 1, 2, 2).global_index(np.arange(4)).tolist() == [2, 3, 6, 7]
    first = shard_steps(0, 2, 2, 8)  # two steps at world 2, then resumed at world 1 (batch 2)
    resumed = shard_steps(8, 1, 2, 15)
    seen = [i for step in first + resumed for i in step]
    assert seen == list(range(14)) and Shard(8, 0, 1, 2).rows(15) == 6


def test_the_data_position_is_stored_as_runs():
    """A resume position of a million skipped samples in a few runs stores as those runs."""
    skip = (*range(10, 500_000), *range(600_000, 1_100_010), 2_000_000)
    runs = skip_runs(skip)
    assert runs == [[10, 499_990], [600_000, 500_010], [2_000_000, 1]]
    assert skip_from_runs(runs) == skip and skip_runs(()) == [] and skip_from_runs([]) == ()
    assert len(json.dumps(runs)) < 100


def test_a_resume_after_unordered_reads_trains_on_every_sample_once():
    """Without preserve_order the steps before a stop train on samples spread over the shard; the
    resume position (start + skip) leaves exactly those out, at any world size."""
    rng = np.random.default_rng(0)
    first = rng.permutation(20)[:8]  # 2 steps of global batch 4, taken from anywhere in [0, 20)
    start, skip = fold_consumed(0, (), first)
    assert start + len(skip) == 8 and start not in first and all(s > start for s in skip)
    more = np.concatenate(
        [Shard(start, r, 2, 2, skip).global_index(np.arange(2)) for r in range(2)]  # one more step
    )
    start, skip = fold_consumed(start, skip, more)
    assert start + len(skip) == 12 and not set(more) & set(first)
    per_rank, total = 4, 30  # resumed at world 1 (batch 4): 4 more steps, the last 2 samples left out
    rest = Shard(start, 0, 1, per_rank, skip)
    assert rest.rows(total) == 16
    rest = rest.global_index(np.arange(16))
    assert sorted([*first, *more, *rest]) == list(range(28))
    assert fold_consumed(start, skip, rest) == (28, ())
    with pytest.raises(RuntimeError, match="trained on twice"):
        fold_consumed(start, skip, [skip[0]] if skip else [start - 1])


# -- Ray: the per-worker loop under ray.init ---------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "A")
    write_store(path, 8, site="A")
    return path


@pytest.fixture(scope="module")
def ray2():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def fit(cfg, tmp_path, name, workers=1):
    from fmct_ray.train.trainer import LaunchConfig, pretrain

    launch = LaunchConfig(
        name=name, storage_path=str(tmp_path), num_workers=workers, cpus_per_worker=0.5, max_failures=0
    )
    result = pretrain(cfg, launch)
    assert result.error is None, result.error
    return result


def rows(checkpoint_dir) -> list[dict]:
    with open(Path(checkpoint_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def check_metrics(d, steps: int, terms: tuple[str, ...]) -> None:
    """metrics.csv has one row per step 1..steps with every loss term and the run-health columns."""
    log = rows(d)
    assert [int(r["step"]) for r in log] == list(range(1, steps + 1))
    for key in ("loss", *terms, "lr", "wd", "scans_per_s", "data_wait_frac", "peak_mem_gb"):
        assert all(r[key] != "" for r in log), key
    assert all(0.0 <= float(r["data_wait_frac"]) <= 1.0 for r in log)


DINO_TERMS = (
    "dino",
    "ibot",
    "koleo",
    "momentum",
    "teacher_temp",
    "teacher_entropy",
    "teacher_marginal_entropy",
    "student_cls_std",
    "teacher_cls_std",
    "log_k",
)


def check_backbone(d, prefix: str = "teacher.backbone.") -> None:
    """The exported backbone loads with `fmct_ray.models.load_backbone` and equals the task's."""
    task = torch.load(Path(d) / "task.pt", weights_only=True)
    backbone = load_backbone(Path(d) / "teacher_backbone.pt")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, task[f"{prefix}{k}"]), k


@pytest.fixture(scope="module")
def dino_run(ray2, store, tmp_path_factory):
    """One uninterrupted 1-worker debug DINO run (8 steps), shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    return root, fit(recipe(DINO, store), root, "dino")


def test_dino_run_checkpoints_and_exports(dino_run):
    root, result = dino_run
    assert result.metrics["step"] == 8 and result.metrics["samples"] == 16
    d = Path(result.checkpoint.path)
    assert {
        "task.pt",
        "optimizer.pt",
        "state.json",
        "config.yaml",
        "rng_rank0.pt",
        "metrics.csv",
        "teacher_backbone.pt",
    } <= {p.name for p in d.iterdir()}
    check_metrics(d, 8, DINO_TERMS)
    check_backbone(d)
    assert len([p for p in Path(root, "dino").iterdir() if p.name.startswith("checkpoint_2")]) == 2


def test_latest_checkpoint_is_the_registered_one(dino_run):
    root, result = dino_run
    assert ckpt.latest_checkpoint(str(root), "dino") == result.checkpoint.path
    # a newer folder that Ray never registered (a group that died while reporting) is ignored
    stray = Path(root, "dino", "checkpoint_2999-01-01_00-00-00.000000")
    stray.mkdir()
    (stray / "state.json").write_text(json.dumps({"step": 99, "samples": 198}))
    assert ckpt.latest_checkpoint(str(root), "dino") == result.checkpoint.path


def assert_same_run(full, resumed) -> None:
    """Bit-identical weights and the same loss at every step."""
    a = torch.load(Path(full.checkpoint.path) / "task.pt", weights_only=True)
    b = torch.load(Path(resumed.checkpoint.path) / "task.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in rows(full.checkpoint.path)] == [
        r["loss"] for r in rows(resumed.checkpoint.path)
    ]


def test_stop_and_resume_equals_uninterrupted(dino_run, store, tmp_path):
    _, full = dino_run
    part = fit(recipe(DINO, store, "train.stop_after=3"), tmp_path, "part")
    assert part.metrics["step"] == 3
    assert not (Path(part.checkpoint.path) / "teacher_backbone.pt").exists()
    resumed = fit(recipe(DINO, store), tmp_path, "part")
    assert resumed.metrics["step"] == 8
    assert_same_run(full, resumed)


def worker_logs() -> str:
    """What the Ray workers of this session printed (the fixture does not forward it)."""
    from ray._private.worker import _global_node

    return "".join(
        p.read_text(errors="replace") for p in Path(_global_node.get_logs_dir_path()).glob("worker-*.out")
    )


def test_resume_passes_over_damaged_checkpoints(dino_run, store, tmp_path):
    """The two newest checkpoints damaged (as an interrupted upload and bad storage leave them):
    the resubmitted run resumes from the newest intact one and ends as the uninterrupted run."""
    _, full = dino_run
    every = ("train.checkpoint_every=2", "train.keep_checkpoints=3")
    part = fit(recipe(DINO, store, *every, "train.stop_after=6"), tmp_path, "damaged")
    found = sorted(p for p in Path(tmp_path, "damaged").iterdir() if p.name.startswith("checkpoint_2"))
    assert [json.loads((p / "state.json").read_text())["step"] for p in found] == [2, 4, 6]
    damage(found[2], "truncated")
    damage(found[1], "no manifest")
    resumed = fit(recipe(DINO, store, *every), tmp_path, "damaged")
    out = worker_logs()
    assert f"checkpoint {found[2]} is damaged" in out and f"checkpoint {found[1]} is damaged" in out
    assert f"resuming from the newest intact checkpoint, {found[0]}" in out
    assert resumed.metrics["step"] == 8 and part.metrics["step"] == 6
    assert [int(r["step"]) for r in rows(resumed.checkpoint.path)] == list(range(1, 9))  # no step twice
    assert_same_run(full, resumed)


@pytest.mark.slow  # the default tier keeps the one-worker and unordered variants
def test_two_worker_stop_and_resume_equals_uninterrupted(ray2, store, tmp_path):
    """With 2 workers too: each rank streams its own shard in order, so the resumed run sees the
    same samples on the same ranks at the same steps (4 steps of global batch 4 over 8 scans)."""
    full = fit(recipe(DINO, store), tmp_path, "full2", workers=2)
    part = fit(recipe(DINO, store, "train.stop_after=2"), tmp_path, "part2", workers=2)
    assert part.metrics["step"] == 2
    resumed = fit(recipe(DINO, store), tmp_path, "part2", workers=2)
    assert resumed.metrics["step"] == full.metrics["step"] == 4
    assert_same_run(full, resumed)


def test_two_worker_unordered_stop_and_resume_trains_on_every_sample_once(ray2, store, tmp_path):
    """Reads finishing in any order (2 readers, no preserve_order): a stop and a resume still end
    with each of the run's 16 samples trained on exactly once (`fold_consumed` raises on a repeat)."""
    fast = ("data.preserve_order=false", "data.readers=2")
    part = fit(recipe(DINO, store, "train.stop_after=2", *fast), tmp_path, "unordered", workers=2)
    state = json.loads((Path(part.checkpoint.path) / "state.json").read_text())
    skip = skip_from_runs(state["skip_runs"])  # what was read out of order (reads finish in any order)
    assert state["samples"] == 8 and len(set(skip)) == len(skip) and all(s > 8 - len(skip) for s in skip)
    resumed = fit(recipe(DINO, store, *fast), tmp_path, "unordered", workers=2)
    state = json.loads((Path(resumed.checkpoint.path) / "state.json").read_text())
    assert (state["step"], state["samples"], state["skip_runs"]) == (4, 16, [])


@pytest.mark.slow  # three Ray Train runs, about 2 minutes
def test_elastic_group_and_a_resize_at_resume(ray2, store, tmp_path):
    """`num_workers=(1, 2)` runs on Ray's elastic scaling; a run stopped with 2 workers and resumed
    with 1 (a resize, as an elastic restart makes) ends with every sample of the run consumed."""
    from fmct_ray.train.trainer import LaunchConfig, pretrain

    launch = LaunchConfig(
        name="elastic",
        storage_path=str(tmp_path),
        num_workers=1,
        max_workers=2,
        cpus_per_worker=0.5,
        max_failures=0,
    )
    result = pretrain(recipe(DINO, store), launch)
    assert result.error is None, result.error
    assert result.metrics["samples"] == 16 and result.metrics["step"] == 16 // result.metrics["global_batch"]
    part = fit(recipe(DINO, store, "train.stop_after=1"), tmp_path, "resize", workers=2)
    assert (part.metrics["step"], part.metrics["samples"]) == (1, 4)
    resumed = fit(recipe(DINO, store), tmp_path, "resize", workers=1)
    assert (resumed.metrics["step"], resumed.metrics["samples"]) == (1 + 6, 16)  # 12 more in 6 steps of 2
    assert [int(r["step"]) for r in rows(resumed.checkpoint.path)] == list(range(1, 8))


@pytest.mark.slow  # tests/test_dist_objectives.py checks the same sums in one process
def test_one_by_four_equals_two_by_two_first_step(ray2, store, tmp_path):
    no_aug = [
        "augment.flip_prob=0",
        "augment.shift_prob=0",
        "augment.smooth_prob=0",
        "augment.gamma_prob=0",
        "train.max_steps=1",
    ]
    one = fit(recipe(DINO, store, "train.batch_size=4", *no_aug), tmp_path, "one", workers=1)
    two = fit(recipe(DINO, store, "train.batch_size=2", *no_aug), tmp_path, "two", workers=2)
    assert one.metrics["global_batch"] == two.metrics["global_batch"] == 4
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=1e-4)


# -- `ray job submit` on a real local cluster, stores and checkpoints on loopback S3 ---------------
@pytest.fixture(scope="module")
def s3_store(s3):
    s3.filesystem().mkdir("data")
    s3.filesystem().mkdir("runs")
    write_store("s3://data/siteA", 8, site="A")
    return "s3://data/siteA"


@pytest.fixture(scope="module")
def cluster():
    from fmct_ray.testing import RayCluster

    with RayCluster(num_cpus=2) as c:
        yield c


def job_args(job, recipe_path, store, name, *extra) -> list[str]:
    return [
        "python",
        f"jobs/{job}.py",
        "--config",
        str(recipe_path.relative_to(ROOT)),
        *(["--stores", f"A={store}"] if store else []),  # None: the sites come from --sites
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--storage",
        "s3://runs",
        "--name",
        name,
        *extra,
    ]


def submit(cluster, s3, *args) -> str:
    """`ray job submit` and wait; returns the job's output (asserting it succeeded)."""
    out = cluster.submit(*args, working_dir=str(ROOT), env=s3.env(), timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    return text


def s3_checkpoints(s3, name) -> list[str]:
    """Registered or not, every checkpoint folder of run `name`, oldest first."""
    fs = s3.filesystem()
    fs.invalidate_cache()
    if not fs.exists(f"runs/{name}"):
        return []
    return sorted(p for p in fs.ls(f"runs/{name}") if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))


def fetch_latest(s3, name, tmp_path) -> Path:
    """Download the run's latest registered checkpoint (the one Ray resumes from)."""
    uri = ckpt.latest_checkpoint("s3://runs", name)
    assert uri is not None, f"run {name} has no registered checkpoint"
    local = tmp_path / uri.rsplit("/", 1)[-1]
    s3.filesystem().get(uri.removeprefix("s3://") + "/", str(local), recursive=True)
    return local


def check_checkpoint(d: Path, steps: int, final: bool) -> dict:
    state = json.loads((d / "state.json").read_text())
    assert state["step"] == steps and state["total_steps"] == 4 and state["global_batch"] == 4
    names = {p.name for p in d.iterdir()}
    assert {"task.pt", "optimizer.pt", "config.yaml", "metrics.csv", "rng_rank0.pt", "rng_rank1.pt"} <= names
    assert ("teacher_backbone.pt" in names) == final
    return state


def test_dino_job_submit_against_s3(cluster, s3, s3_store, tmp_path):
    """The issue's evidence: `ray job submit` of jobs/pretrain_dino.py, debug recipe, 2 CPU workers,
    store and checkpoints on the loopback S3 server. 8 scans / (2 workers x 2) = 2 steps x 2 epochs."""
    out = submit(cluster, s3, *job_args("pretrain_dino", DINO, s3_store, "dino-submit"))
    assert "[step 4/4" in out
    d = fetch_latest(s3, "dino-submit", tmp_path)
    check_checkpoint(d, 4, final=True)
    check_metrics(d, 4, DINO_TERMS)
    check_backbone(d)
    assert len(s3_checkpoints(s3, "dino-submit")) == 1  # checkpoint_every 4: the final one only


@pytest.mark.slow
def test_mae_job_stops_then_resumes_when_resubmitted(cluster, s3, s3_store, tmp_path):
    """MAE end to end through the job CLI, in two submissions of the same run name."""
    args = job_args("pretrain_mae", MAE, s3_store, "mae-resubmit")
    submit(cluster, s3, *args, "--set", "train.stop_after=2")
    check_checkpoint(fetch_latest(s3, "mae-resubmit", tmp_path / "a"), 2, final=False)
    out = submit(cluster, s3, *args)
    assert [k for k, _ in progress(out)] == [3, 4]  # resumed at step 2, did not start over
    d = fetch_latest(s3, "mae-resubmit", tmp_path / "b")
    check_checkpoint(d, 4, final=True)
    check_metrics(d, 4, ("mae",))
    check_backbone(d, prefix="model.encoder.")


def progress(out: str) -> list[tuple[int, str]]:
    """(step, loss) of the console progress lines, each once: the job log echoes some twice, and
    an echo comes from the same worker process, while a step replayed after a restart comes from a
    new one (with the same loss when the kill fell just after it)."""
    seq: list[tuple[int, str]] = []
    last = None
    for line in out.splitlines():
        if "[step " in line and " loss " in line:
            tail = line[line.index("[step ") + 6 :]
            item = (int(tail.split("/", 1)[0]), tail.split(" loss ", 1)[1].split()[0])
            pid = re.search(r"pid=(\d+)", line)
            key = (pid and pid.group(1), item)
            if key != last:
                seq.append(item)
            last = key
    return seq


def train_worker_pids(cluster) -> list[int]:
    """Ray Train worker processes of `cluster`: descendants of its raylet whose (renamed) process
    title names the RayTrainWorker actor."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "raylet" in cmd and cluster.tmp in cmd:
            found += [
                c.pid for c in proc.children(recursive=True) if "RayTrainWorker" in " ".join(c.cmdline())
            ]
    return sorted(found)


def start(cluster, args, env) -> tuple[threading.Thread, list]:
    """`ray job submit` in a thread: (the thread, a list that gets the finished process)."""
    done: list = []
    job = threading.Thread(
        target=lambda: done.append(cluster.submit(*args, working_dir=str(ROOT), env=env, timeout=600))
    )
    job.start()
    return job, done


def wait_for(condition, job: threading.Thread, what: str, timeout: float = 300):
    """Poll `condition` while the job runs; returns its first true value (asserting there is one)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline and job.is_alive():
        time.sleep(0.2)
    assert value, what
    return value


def finished(job: threading.Thread, done: list, tmp_path) -> str:
    """Wait for the job; returns its output (kept in tmp_path/job.log), asserting it succeeded."""
    job.join(600)
    out = done[0].stdout + done[0].stderr
    (tmp_path / "job.log").write_text(out)
    assert done[0].returncode == 0, out[-4000:]
    return out


def check_one_restart(out: str, d: Path, resumed_after: int | None = None) -> None:
    """A 12-step run (checkpoints every 2 steps) that restarted once from a checkpoint (from step
    `resumed_after` where given): replayed steps repeat their loss, metrics rows 1..12 once."""
    state = json.loads((d / "state.json").read_text())
    assert state["step"] == 12 and state["samples"] == 48  # 6 epochs x 2 steps x global batch 4
    assert "teacher_backbone.pt" in {p.name for p in d.iterdir()}
    seq = progress(out)
    assert seq[0][0] == 1 and seq[-1][0] == 12, seq
    back = [i for i in range(1, len(seq)) if seq[i][0] <= seq[i - 1][0]]
    assert len(back) == 1, f"expected one restart: {seq}"
    redo = seq[back[0]][0]
    assert redo > 1 and (redo - 1) % 2 == 0, f"did not resume from a checkpoint (every 2 steps): {seq}"
    if resumed_after is not None:
        assert redo == resumed_after + 1, f"did not resume from step {resumed_after}: {seq}"
    first = dict(seq[: back[0]])
    assert all(first[k] == v for k, v in seq[back[0] :] if k in first), "replayed steps differ"
    assert [int(r["step"]) for r in rows(d)] == list(range(1, 13))


KILL_ARGS = ("--set", "train.epochs=6", "--set", "train.checkpoint_every=2")


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(cluster, s3, s3_store, tmp_path):
    """SIGKILL one training worker after the first registered checkpoint: FailureConfig restarts
    the group, it resumes from that checkpoint and the run ends at the right step."""
    name = "dino-kill"
    job, done = start(cluster, job_args("pretrain_dino", DINO, s3_store, name, *KILL_ARGS), s3.env())
    wait_for(lambda: ckpt.latest_checkpoint("s3://runs", name), job, "no checkpoint was registered")
    pids = train_worker_pids(cluster)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    out = finished(job, done, tmp_path)
    check_one_restart(out, fetch_latest(s3, name, tmp_path))


@pytest.mark.slow
def test_workers_killed_while_a_checkpoint_uploads_resume_from_the_newest_intact_one(
    cluster, s3, s3_store, tmp_path
):
    """Uploads to S3 slowed to 512 kB/s per connection (a relay in front of the server): both
    training workers are SIGKILLed while the second checkpoint is being written (its folder is
    in the bucket, not registered). The half-written folder stays there, fails `verify`, and is
    never resumed from: FailureConfig restarts the group from the first checkpoint and the run
    ends at the right step, every step once."""
    from fmct_ray.testing import Relay

    name = "dino-kill-upload"
    args = job_args("pretrain_dino", DINO, s3_store, name, *KILL_ARGS)
    with Relay(s3.port, upload_rate=512e3) as relay:
        job, done = start(cluster, args, {**s3.env(), "AWS_ENDPOINT_URL": relay.endpoint})
        first = wait_for(
            lambda: ckpt.latest_checkpoint("s3://runs", name), job, "no checkpoint was registered"
        )
        newer = wait_for(
            lambda: [p for p in s3_checkpoints(s3, name) if p > first.removeprefix("s3://")],
            job,
            "no second checkpoint was being written",
        )
        pids = train_worker_pids(cluster)
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert ckpt.latest_checkpoint("s3://runs", name) == first, "the upload finished before the kill"
        # read now: keep_checkpoints removes it once newer ones are registered
        step = json.loads(s3.filesystem().cat(first.removeprefix("s3://") + "/state.json"))["step"]
        out = finished(job, done, tmp_path)
    partial = tmp_path / "partial"
    s3.filesystem().get(newer[0] + "/", str(partial), recursive=True)
    assert ckpt.verify(partial) is not None, "the interrupted checkpoint is whole"
    d = fetch_latest(s3, name, tmp_path)
    assert d.name != newer[0].rsplit("/", 1)[-1]
    check_one_restart(out, d, resumed_after=step)


@pytest.mark.slow
def test_a_storage_outage_fails_the_group_and_the_run_completes_once_storage_is_back(
    cluster, s3, s3_store, tmp_path
):
    """The S3 endpoint of the store and the checkpoints (a relay in front of the server) goes away
    for 20 s after the first registered checkpoint, while the readers are still reading (12
    epochs of the 8 scans). The store's reads give up after 2 retries:
    the worker group fails with an error naming the store, FailureConfig restarts it, the
    checkpoint storage rides the rest out on its retries (8), and the run resumes from its last
    checkpoint and ends at the right step, every step once."""
    from fmct_ray.testing import Relay

    name = "dino-outage"
    sites = tmp_path / "sites.yaml"
    sites.write_text(f"sites:\n  - name: A\n    uri: {s3_store}\n    storage: {{retries: 2}}\n")
    epochs = ("--set", "train.epochs=12", "--set", "train.checkpoint_every=2")
    args = job_args("pretrain_dino", DINO, None, name, *epochs, "--sites", str(sites), "--max-failures", "5")
    with Relay(s3.port) as relay:
        job, done = start(cluster, args, {**s3.env(), "AWS_ENDPOINT_URL": relay.endpoint})
        wait_for(lambda: ckpt.latest_checkpoint("s3://runs", name), job, "no checkpoint was registered")
        relay.down()
        time.sleep(20)
        relay.up()
        out = finished(job, done, tmp_path)
    assert f"StorageError: store {s3_store}: reading " in out
    d = fetch_latest(s3, name, tmp_path)
    state = json.loads((d / "state.json").read_text())
    assert state["step"] == 24 and state["samples"] == 96  # 12 epochs x 2 steps x 4
    assert [int(r["step"]) for r in rows(d)] == list(range(1, 25))
    assert "Training failed due to worker errors" in out  # the group failed, and was restarted
    assert progress(out)[-1][0] == 24  # replayed steps repeat their loss exactly (progress() dedups)


@pytest.mark.parametrize("recipe", [DINO, MAE])
def test_debug_recipes_learn_at_their_batch(recipe):
    """Issue 11, defect 1: lr is per 256 samples, so the debug recipes' peak lr at the tests' global
    batch (2 workers x 2) must still move the weights (it was 3.9e-6: the student moved 3.6e-4)."""
    from fmct_ray.objectives import build_optimizer
    from fmct_ray.train.pretrain import PretrainConfig, build_task

    cfg = C.load(PretrainConfig, recipe)
    peak = scaled_lr(cfg.optim.lr, 2 * cfg.train.batch_size * cfg.train.accum_steps)
    assert 5e-4 <= peak <= 5e-3
    task = build_task(cfg)
    opt = build_optimizer(task.trainable, cfg.optim)
    for group in opt.param_groups:
        group["lr"] = peak
    before = torch.nn.utils.parameters_to_vector(task.trainable.parameters()).detach().clone()
    gen = torch.Generator().manual_seed(0)
    crops = cfg.data.crops
    for step in range(10):
        g = [torch.rand(4, 3, *(crops.global_size,) * 3, generator=gen) for _ in range(crops.n_global)]
        loc = [torch.rand(4, 3, *(crops.local_size,) * 3, generator=gen) for _ in range(crops.n_local)]
        p = Progress((step + 1) * 4, 40)
        task(g, loc, p)["loss"].backward()
        task.after_backward(p)
        opt.step()
        opt.zero_grad()
        task.after_step(p)
    after = torch.nn.utils.parameters_to_vector(task.trainable.parameters()).detach()
    assert (after - before).norm() / before.norm() > 1e-2
