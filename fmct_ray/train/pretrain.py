"""Self-supervised pretraining (DINO, MAE): the recipe config and the per-worker Ray Train loop.

`train_loop_per_worker(config)` is what every Ray Train worker runs (and what the tests run): it
builds the task, wraps the trainable module in DDP (`ray.train.torch.prepare_model`; the EMA
teacher stays unwrapped), resumes from the newest intact checkpoint of the run, then runs the optimiser
steps that take the run to its planned total of samples, over its shard of the streaming dataset:

    micro-batches of int16 crops -> batched augmentation on the device -> task losses
    -> backward (no all-reduce but on the last micro-step) -> clip -> AdamW -> EMA teacher

The run is planned in samples (`RunLength`), not steps: every schedule (lr, weight decay, teacher
momentum and temperature, warm-ups, last-layer freeze) is a function of the samples consumed over
the planned total, and the lr is scaled by the global batch in use, so a group that runs on fewer
workers than planned (elastic), or resumes on another number of them, runs more, smaller steps on
the same schedule. A step is scheduled at the samples consumed once it completes, so the last step
(which may pass the total by less than a global batch) runs at the final values (min_lr, momentum
1). Every rank runs the same number of steps (no short batches), and every random draw of a step
(augmentation, masks, drop-path) comes from independent streams seeded by (seed, step, rank,
micro-step), so a run stopped and resumed matches an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fmct_ray.data.augment import AugmentConfig, GPUAugment
from fmct_ray.data.sampling import Shard, fold_consumed, skip_from_runs, skip_runs
from fmct_ray.data.source import DataConfig, iter_shard
from fmct_ray.objectives import (
    DINOConfig,
    DINOTask,
    MAEConfig,
    MAETask,
    OptimConfig,
    Progress,
    Task,
    apply_schedule,
    build_optimizer,
    clip_gradients,
    lr_at,
    scaled_lr,
    weight_decay_at,
)
from fmct_ray.train import checkpoint as ckpt
from fmct_ray.train.metrics import RunLog, StepTimer, echo, peak_memory_gb, print_progress


@dataclass(frozen=True)
class TrainConfig:
    """Length, batching, checkpointing and logging of a run (cluster shape is not here).

    Run length, warm-ups and freeze are planned in samples (epochs x `data.samples_per_epoch`),
    whatever the number of workers; steps follow from the global batch in use.

    Args:
        epochs: run length in epochs (an epoch is `data.samples_per_epoch` samples).
        max_steps: plan max_steps x the launch's global batch samples instead (debug / benchmarks).
        batch_size: samples per worker per micro-step.
        accum_steps: micro-steps per optimiser step (global batch = batch x accum x workers).
        warmup_epochs: linear lr warm-up.
        teacher_temp_warmup_epochs: teacher temperature warm-up (sets dino.warmup_teacher_temp_samples).
        freeze_last_layer_epochs: DINO prototype layer frozen this long (FM-CT: 1; sets
            dino.freeze_last_layer_samples).
        checkpoint_every: optimiser steps between checkpoints (and one at the end).
        keep_checkpoints: checkpoints kept in storage.
        log_every: optimiser steps between metrics rows.
        seed: model init, augmentation, masks.
        bf16: bf16 autocast (GPU only; CPU runs in float32).
        export_backbone: write the teacher (DINO) or encoder (MAE) backbone into the final checkpoint.
        stop_after: end this invocation after this many steps (with a checkpoint), e.g. to fit a
            queue's time slot; re-submitting the run resumes it.
    """

    epochs: float = 100.0
    max_steps: int | None = None
    batch_size: int = 64
    accum_steps: int = 1
    warmup_epochs: float = 5.0
    teacher_temp_warmup_epochs: float = 0.0
    freeze_last_layer_epochs: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    bf16: bool = True
    export_backbone: bool = True
    stop_after: int | None = None


@dataclass(frozen=True)
class PretrainConfig:
    """Root config of `configs/pretrain/*.yaml`.

    Args:
        objective: "dino" (uses `dino`, global + local views) or "mae" (uses `mae`, global view 0).
        augment: device-side augmentation of global views (MAE: its only view).
        augment_local: augmentation of local views (None: same as `augment`).
    """

    objective: Literal["dino", "mae"] = "dino"
    dino: DINOConfig = field(default_factory=DINOConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_local: AugmentConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class RunLength:
    """The planned run in samples, fixed at launch: the horizon of every schedule at any world size."""

    samples_per_epoch: int
    total_samples: int


def run_length(cfg: PretrainConfig, samples_per_epoch: int, world_size: int) -> RunLength:
    """epochs x samples_per_epoch samples, or max_steps x the global batch at `world_size` (the
    launch's planned one: `max_workers` when elastic)."""
    t = cfg.train
    if t.max_steps:
        total = t.max_steps * t.batch_size * t.accum_steps * world_size
    else:
        total = int(t.epochs * samples_per_epoch)
    return RunLength(samples_per_epoch, max(1, total))


def resolve(cfg: PretrainConfig, length: RunLength) -> PretrainConfig:
    """Turn the task's epoch-valued settings into sample counts (the saved config is the one that ran)."""
    spe, t = length.samples_per_epoch, cfg.train
    dino = dataclasses.replace(
        cfg.dino,
        warmup_teacher_temp_samples=int(t.teacher_temp_warmup_epochs * spe),
        freeze_last_layer_samples=int(t.freeze_last_layer_epochs * spe),
    )
    return dataclasses.replace(cfg, dino=dino)


def steps_left(samples: int, total_samples: int, global_batch: int) -> int:
    """Optimiser steps of `global_batch` from `samples` consumed to the planned total (the last one
    may pass it by less than a global batch)."""
    return max(0, -(-(total_samples - samples) // global_batch))


# -- building blocks ---------------------------------------------------------------------------
def build_task(cfg: PretrainConfig) -> Task:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return DINOTask(cfg.dino) if cfg.objective == "dino" else MAETask(cfg.mae)


def build_augment(cfg: PretrainConfig) -> tuple[GPUAugment, GPUAugment]:
    return GPUAugment(cfg.augment), GPUAugment(cfg.augment_local or cfg.augment)


def step_seeds(seed: int, step: int, rank: int, micro: int) -> tuple[int, int, int]:
    """Independent 63-bit seeds of a micro-step's drop-path, mask and augmentation streams."""
    children = np.random.SeedSequence([seed, step, rank, micro]).spawn(3)
    return tuple(int(c.generate_state(1, np.uint64)[0] >> np.uint64(1)) for c in children)


def seed_everything_for(task: Task, seeds: tuple[int, int, int]) -> torch.Generator:
    """Seed the global RNG (drop-path) and the task's mask generator; return the augment generator."""
    torch.manual_seed(seeds[0])
    task.mask_generator.manual_seed(seeds[1])
    return torch.Generator().manual_seed(seeds[2])


def split_views(crops: torch.Tensor, augment: GPUAugment, gen: torch.Generator) -> list[torch.Tensor]:
    """(B, V, S, S, S) int16 -> V augmented float tensors (B, C, S, S, S), one augment call."""
    b, v = crops.shape[:2]
    x = augment(crops.flatten(0, 1), gen).unflatten(0, (b, v))
    return [x[:, i] for i in range(v)]


def forward(task: Task, batch: dict, progress: Progress, augs: tuple[GPUAugment, GPUAugment], gen) -> dict:
    globals_ = split_views(batch["global"], augs[0], gen)
    locals_ = split_views(batch["local"], augs[1], gen) if "local" in batch else []
    return task(globals_, locals_, progress)


def schedules(cfg: PretrainConfig, length: RunLength, progress: Progress, global_batch: int) -> dict:
    """lr (scaled by the global batch in use) and weight decay at `progress`."""
    o = cfg.optim
    warmup = int(cfg.train.warmup_epochs * length.samples_per_epoch)
    now, total = progress.samples, progress.total
    return {
        "lr": lr_at(now, total, scaled_lr(o.lr, global_batch), o.min_lr, warmup),
        "wd": weight_decay_at(now, total, o.weight_decay, o.weight_decay_end),
    }


# -- one optimiser step ------------------------------------------------------------------------
@dataclass
class Loop:
    """What the step function needs, built once per worker."""

    cfg: PretrainConfig
    length: RunLength
    task: Task
    model: torch.nn.Module  # the (possibly DDP-wrapped) trainable module
    optimizer: torch.optim.Optimizer
    augs: tuple[GPUAugment, GPUAugment]
    device: torch.device
    rank: int = 0
    world: int = 1
    log: RunLog | None = None  # rank 0's metrics.csv + TensorBoard events (set by `restore`)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.accum_steps * self.world

    def autocast(self):
        on_gpu = self.device.type == "cuda" and self.cfg.train.bf16
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    def sync(self, micro: int, n: int):
        """Skip DDP's gradient all-reduce on every micro-step but the last."""
        last = micro == n - 1
        skip = not last and hasattr(self.model, "no_sync")
        return self.model.no_sync() if skip else contextlib.nullcontext()


def train_step(loop: Loop, micro_batches: list[dict], step: int, progress: Progress) -> dict[str, float]:
    """One optimiser step scheduled at `progress` (the samples consumed once it completes); `step`
    (0-based) seeds its random draws. Returns the micro-step means of the task's outputs and the
    schedule values."""
    sched = schedules(loop.cfg, loop.length, progress, loop.global_batch)
    apply_schedule(loop.optimizer, sched["lr"], sched["wd"])
    n, terms = len(micro_batches), {}
    for i, batch in enumerate(micro_batches):
        gen = seed_everything_for(loop.task, step_seeds(loop.cfg.train.seed, step, loop.rank, i))
        with loop.sync(i, n), loop.autocast():
            out = forward(loop.task, batch, progress, loop.augs, gen)
        (out["loss"] / n).backward()
        for k, v in out.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / n
    values = dict(zip(terms, torch.stack(list(terms.values())).tolist(), strict=True))  # one sync
    loop.task.after_backward(progress)
    params = [p for p in loop.model.parameters() if p.requires_grad]
    values["grad_norm"] = float(clip_gradients(params, loop.cfg.optim.clip_grad))
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return {**values, **sched, **loop.task.after_step(progress)}


# -- the worker function -----------------------------------------------------------------------
def micro_batches(batches, n: int, timer: StepTimer):
    """Group the shard's batches into lists of `n` micro-batches, timing the wait for each."""
    group: list[dict] = []
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        timer.waited(time.perf_counter() - t0)
        if batch is None:
            return
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def global_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (log steps only; the losses are per-rank means of equal batches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def all_ranks(values: torch.Tensor):
    """The concatenation of every rank's equally long 1-D `values`, as numpy on the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, values)
        values = torch.cat(parts)
    return values.cpu().numpy()


def build_loop(cfg: PretrainConfig, length: RunLength) -> Loop:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    task = build_task(cfg).to(device)
    model = task.wrap(ray.train.torch.prepare_model)
    optimizer = build_optimizer(task.trainable, cfg.optim)
    task.train()
    augs = build_augment(cfg)
    return Loop(cfg, length, task, model, optimizer, augs, device, ctx.get_world_rank(), ctx.get_world_size())


def restore(loop: Loop) -> dict:
    """State of the newest intact checkpoint of the run, or a fresh start; rank 0 opens the run's
    metrics log (in the run folder, continued from the checkpoint's history).

    Ray hands a restarted group its latest registered checkpoint; one that a write left incomplete
    or that was damaged since would fail every restart, so each registered checkpoint is verified
    (`checkpoint.verify`), newest first, and the first whole one is resumed from, with a line for
    each one passed over. Every rank reads the same files, so every rank picks the same one."""
    import ray.train

    if ray.train.get_checkpoint() is None:
        loop.log = open_run_log(loop, 0, None)
        return {"step": 0, "samples": 0}
    damaged = []
    for r in sorted(ray.train.get_all_reported_checkpoints(), key=lambda r: -r.metrics.get("step", -1)):
        with r.checkpoint.as_directory() as d:
            problem = ckpt.verify(d)
            if problem is None:
                if damaged and loop.rank == 0:
                    echo(f"resuming from the newest intact checkpoint, {r.checkpoint.path}")
                state = ckpt.load(d, loop.rank, loop.task, loop.optimizer)
                loop.log = open_run_log(loop, state["step"], Path(d) / "metrics.csv")  # copied while d exists
                return state
        damaged.append(f"{r.checkpoint.path}: {problem}")
        if loop.rank == 0:
            echo(f"WARNING checkpoint {r.checkpoint.path} is damaged, not resuming from it: {problem}")
    raise RuntimeError("no intact checkpoint to resume from:\n  " + "\n  ".join(damaged))


def open_run_log(loop: Loop, resume_step: int, history: Path | None) -> RunLog | None:
    """Rank 0's metrics.csv + TensorBoard events, mirrored into the run folder <storage>/<name>/."""
    import ray.train

    if loop.rank != 0:
        return None
    storage = ray.train.get_context().get_storage()
    return RunLog(storage.experiment_fs_path, storage.storage_filesystem, resume_step, history)


def data_position(state: dict) -> tuple[int, tuple[int, ...]]:
    """(start, skip) of a checkpoint's state: the samples below `start` and those in `skip` are
    trained on (`fold_consumed`); `samples` counts both."""
    skip = skip_from_runs(state.get("skip_runs", ())) or tuple(state.get("skip", ()))  # or older checkpoints
    return state["samples"] - len(skip), skip


def report(loop: Loop, row: dict, state: dict, final: bool) -> None:
    """Checkpoint on every rank (Ray merges the folders; report() is a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        extra = ()
        if final and loop.rank == 0 and loop.cfg.train.export_backbone:
            extra = (export_backbone(loop.task, Path(d) / "teacher_backbone.pt").name,)
        ckpt.save(
            d,
            loop.rank,
            task=loop.task,
            optimizer=loop.optimizer,
            state=state,
            cfg=loop.cfg,
            metrics_csv=str(loop.log.csv_path) if loop.log else None,
            world=loop.world,
            extra=extra,
        )
        metrics = {**row, **{k: v for k, v in state.items() if k != "skip_runs"}}  # in state.json only
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def export_backbone(task: Task, path: Path) -> Path:
    """The DINO teacher's (MAE: the encoder's) backbone with its config (`load_backbone` reads it)."""
    from fmct_ray.models import save_backbone

    return save_backbone(path, task.backbone_to_export())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config`: {"cfg": PretrainConfig (resolved), "length": RunLength,
    "plan": Plan (the run's scan ids)}."""
    cfg, length = config["cfg"], config["length"]
    loop = build_loop(cfg, length)
    state = restore(loop)
    # Any world size (elastic restarts change it): the steps that reach the planned samples.
    steps = steps_left(state["samples"], length.total_samples, loop.global_batch)
    start, skip = data_position(state)
    shard = Shard(start, loop.rank, loop.world, cfg.train.batch_size * cfg.train.accum_steps, skip)
    end = state["samples"] + steps * loop.global_batch  # the samples those steps read
    total = state["step"] + steps
    stop = total if cfg.train.stop_after is None else min(total, cfg.train.stop_after)
    timer = StepTimer()
    batches = iter_shard(cfg.data, config["plan"], end, shard, cfg.train.batch_size, loop.device)
    groups = micro_batches(batches, cfg.train.accum_steps, timer)
    run_steps(loop, groups, timer, state, (stop, total))


COLLAPSE_PATIENCE = 5  # consecutive logged steps


def collapse_warning(recent: Sequence[dict], patience: int = COLLAPSE_PATIENCE) -> str | None:
    """Why the last `patience` logged rows all look collapsed, or None.

    With K prototypes (the rows' `log_k`), from `DINOTask`'s monitors:
    - teacher_marginal_entropy < 0.1 log K: the batch-mean teacher distribution spreads over about
      K^0.1 prototypes or fewer (3 of 65,536): every sample gets the same prototype(s);
    - teacher_entropy > 0.97 log K: every teacher output is nearly uniform (centring won over
      sharpening);
    - teacher_cls_std < 1e-4: the teacher backbone gives every sample the same CLS embedding.
    Rows without the monitors (MAE) or with NaNs never warn. The monitors are per-rank micro-batch
    values averaged over micro-steps and ranks; a marginal entropy over n teacher views is at most
    log n + the per-sample entropy, so the first check assumes well over K^0.1 views per micro-batch.
    """
    rows = list(recent)[-patience:]
    if len(rows) < patience or not all("log_k" in r for r in rows):
        return None
    last, log_k = rows[-1], rows[-1]["log_k"]
    reasons = []
    if all(r["teacher_marginal_entropy"] < 0.1 * log_k for r in rows):
        reasons.append(
            f"teacher marginal entropy {last['teacher_marginal_entropy']:.3g} < 0.1 log K "
            f"= {0.1 * log_k:.3g} (one prototype for every sample)"
        )
    if all(r["teacher_entropy"] > 0.97 * log_k for r in rows):
        reasons.append(
            f"teacher entropy {last['teacher_entropy']:.4g} > 0.97 log K = {0.97 * log_k:.4g} "
            "(uniform teacher outputs)"
        )
    if all(r["teacher_cls_std"] < 1e-4 for r in rows):
        reasons.append(f"teacher CLS std {last['teacher_cls_std']:.2g} < 1e-4 (one embedding for all)")
    return f"{'; '.join(reasons)}, for {patience} logged steps" if reasons else None


def run_steps(loop: Loop, groups, timer: StepTimer, state: dict, stop_total: tuple[int, int]) -> None:
    """Steps `state["step"]` .. `stop`: train, log every `log_every` (rank 0 also warns of
    collapse), checkpoint every `checkpoint_every` and at `stop`; the checkpoint at `total` (end of
    the run) exports the backbone."""
    cfg, step, samples, per_step = loop.cfg, state["step"], state["samples"], loop.global_batch
    stop, total = stop_total
    position = data_position(state)
    consumed: list[torch.Tensor] = []  # run indices trained on since the last checkpoint
    recent: deque[dict] = deque(maxlen=COLLAPSE_PATIENCE)  # logged rows
    while step < stop:
        group = next(groups, None)
        if group is None:
            raise RuntimeError(f"data ran out at step {step} of {total} (rank {loop.rank})")
        row = train_step(loop, group, step, Progress(samples + per_step, loop.length.total_samples))
        consumed += [b["index"] for b in group]
        timer.step()
        step, samples = step + 1, samples + per_step
        new_state = {
            "step": step,
            "samples": samples,
            "epoch": samples / loop.length.samples_per_epoch,
            "total_steps": total,
            "total_samples": loop.length.total_samples,
            "global_batch": per_step,
        }
        logged = step % cfg.train.log_every == 0 or step == stop
        if logged:
            row = global_mean(row, loop.device)
            row.update(
                timer.summary(per_step),
                step=step,
                samples=samples,
                epoch=new_state["epoch"],
                peak_mem_gb=peak_memory_gb(loop.device),
                time=time.time(),
            )
            timer.reset()
            if loop.log is not None:
                loop.log.write(row)
                print_progress(row, total)
                recent.append(row)
                warning = collapse_warning(recent)
                if warning:
                    echo(f"WARNING collapse: {warning}")
        if step % cfg.train.checkpoint_every == 0 or step == stop:
            position = fold_consumed(*position, all_ranks(torch.cat(consumed)))
            consumed.clear()
            new_state["skip_runs"] = skip_runs(position[1])
            report(loop, row if logged else {}, new_state, final=step == total)
    if loop.log is not None:
        loop.log.close()
