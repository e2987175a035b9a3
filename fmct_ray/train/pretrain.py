"""Self-supervised pretraining (DINO, MAE): the recipe config and the per-worker Ray Train loop.

`train_loop_per_worker(config)` is what every Ray Train worker runs (and what the tests run): it
builds the task, wraps the trainable module in DDP (`ray.train.torch.prepare_model`; the EMA
teacher stays unwrapped), resumes from `ray.train.get_checkpoint()`, then runs a fixed number of
optimiser steps over its shard of the streaming dataset:

    micro-batches of int16 crops -> batched augmentation on the device -> task losses
    -> backward (no all-reduce but on the last micro-step) -> clip -> AdamW -> EMA teacher

Every rank runs the same number of steps (no short batches), all schedules are functions of the
global step, and every random draw of a step (augmentation, masks, drop-path) is seeded from
(seed, step, rank, micro-step), so a run stopped and resumed matches an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fmct_ray.data.augment import AugmentConfig, GPUAugment
from fmct_ray.data.source import DataConfig, Shard, fold_consumed, iter_shard
from fmct_ray.objectives import (
    DINOConfig,
    DINOTask,
    MAEConfig,
    MAETask,
    OptimConfig,
    apply_schedule,
    build_optimizer,
    clip_gradients,
    lr_at,
    scaled_lr,
    weight_decay_at,
)
from fmct_ray.train import checkpoint as ckpt
from fmct_ray.train.metrics import CSVLog, StepTimer, peak_memory_gb, print_progress


@dataclass(frozen=True)
class TrainConfig:
    """Length, batching, checkpointing and logging of a run (cluster shape is not here).

    Args:
        epochs: run length in epochs (an epoch is `data.samples_per_epoch` samples).
        max_steps: stop after this many optimiser steps instead (debug / benchmarks).
        batch_size: samples per worker per micro-step.
        accum_steps: micro-steps per optimiser step (global batch = batch x accum x workers).
        warmup_epochs: linear lr warm-up (sets optim.warmup_steps).
        teacher_temp_warmup_epochs: teacher temperature warm-up (sets dino.warmup_teacher_temp_steps).
        freeze_last_layer_epochs: DINO prototype layer frozen this long (FM-CT: 1).
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
    """Run length in steps and samples for a given global batch."""

    samples_per_epoch: int
    global_batch: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.samples_per_epoch // self.global_batch)

    @property
    def total_samples(self) -> int:
        return self.total_steps * self.global_batch


def run_length(cfg: PretrainConfig, samples_per_epoch: int, world_size: int) -> RunLength:
    gb = cfg.train.batch_size * cfg.train.accum_steps * world_size
    steps = cfg.train.max_steps or int(cfg.train.epochs * max(1, samples_per_epoch // gb))
    return RunLength(samples_per_epoch, gb, steps)


def resolve(cfg: PretrainConfig, length: RunLength) -> PretrainConfig:
    """Turn epoch-valued settings into step counts (the saved config is the one that ran)."""
    spe, t = length.steps_per_epoch, cfg.train
    optim = dataclasses.replace(cfg.optim, warmup_steps=int(t.warmup_epochs * spe))
    dino = dataclasses.replace(
        cfg.dino,
        total_steps=length.total_steps,
        warmup_teacher_temp_steps=int(t.teacher_temp_warmup_epochs * spe),
        freeze_last_layer_steps=int(t.freeze_last_layer_epochs * spe),
    )
    return dataclasses.replace(cfg, optim=optim, dino=dino)


# -- building blocks ---------------------------------------------------------------------------
def build_task(cfg: PretrainConfig) -> DINOTask | MAETask:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return DINOTask(cfg.dino) if cfg.objective == "dino" else MAETask(cfg.mae)


def trainable(task: DINOTask | MAETask) -> torch.nn.Module:
    return task.student if isinstance(task, DINOTask) else task.model


def wrap_for_ddp(task: DINOTask | MAETask, wrapper) -> torch.nn.Module:
    """Wrap only the trainable module (DINO student / MAE model); returns the wrapped module."""
    (task.wrap_student if isinstance(task, DINOTask) else task.wrap_model)(wrapper)
    return task._wrapped


def build_augment(cfg: PretrainConfig) -> tuple[GPUAugment, GPUAugment]:
    return GPUAugment(cfg.augment), GPUAugment(cfg.augment_local or cfg.augment)


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return (((seed * 1_000_003 + step) * 1_009 + rank) * 101 + micro) % (2**63 - 1)


def seed_everything_for(task, seed: int) -> torch.Generator:
    """Seed the global RNG (drop-path) and the task's mask generator; return the augment generator."""
    torch.manual_seed(seed)
    task.mask_generator.manual_seed(seed + 1)
    return torch.Generator().manual_seed(seed + 2)


def split_views(crops: torch.Tensor, augment: GPUAugment, gen: torch.Generator) -> list[torch.Tensor]:
    """(B, V, S, S, S) int16 -> V augmented float tensors (B, C, S, S, S), one augment call."""
    b, v = crops.shape[:2]
    x = augment(crops.flatten(0, 1), gen).unflatten(0, (b, v))
    return [x[:, i] for i in range(v)]


def forward(task, batch: dict, step: int, augs: tuple[GPUAugment, GPUAugment], gen) -> dict:
    globals_ = split_views(batch["global"], augs[0], gen)
    if isinstance(task, MAETask):
        return task(globals_[0], step)
    locals_ = split_views(batch["local"], augs[1], gen) if "local" in batch else []
    return task(globals_, locals_, step)


def schedules(cfg: PretrainConfig, length: RunLength, step: int) -> dict[str, float]:
    o = cfg.optim
    base_lr = scaled_lr(o.lr, length.global_batch)
    return {
        "lr": lr_at(step, length.total_steps, base_lr, o.min_lr, o.warmup_steps),
        "wd": weight_decay_at(step, length.total_steps, o.weight_decay, o.weight_decay_end),
    }


# -- one optimiser step ------------------------------------------------------------------------
@dataclass
class Loop:
    """What the step function needs, built once per worker."""

    cfg: PretrainConfig
    length: RunLength
    task: Any
    model: torch.nn.Module  # the (possibly DDP-wrapped) trainable module
    optimizer: torch.optim.Optimizer
    augs: tuple[GPUAugment, GPUAugment]
    device: torch.device
    rank: int = 0

    def autocast(self):
        on_gpu = self.device.type == "cuda" and self.cfg.train.bf16
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    def sync(self, micro: int, n: int):
        """Skip DDP's gradient all-reduce on every micro-step but the last."""
        last = micro == n - 1
        skip = not last and hasattr(self.model, "no_sync")
        return self.model.no_sync() if skip else contextlib.nullcontext()


def train_step(loop: Loop, micro_batches: list[dict], step: int) -> dict[str, float]:
    sched = schedules(loop.cfg, loop.length, step)
    apply_schedule(loop.optimizer, sched["lr"], sched["wd"])
    terms: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        gen = seed_everything_for(loop.task, step_seed(loop.cfg.train.seed, step, loop.rank, i))
        with loop.sync(i, len(micro_batches)), loop.autocast():
            out = forward(loop.task, batch, step, loop.augs, gen)
        (out["loss"] / len(micro_batches)).backward()
        for k, v in out.items():
            terms[k] = terms.get(k, 0.0) + float(v.detach()) / len(micro_batches)
    if isinstance(loop.task, DINOTask):
        loop.task.cancel_last_layer_grads(step)
    params = [p for p in loop.model.parameters() if p.requires_grad]
    terms["grad_norm"] = float(clip_gradients(params, loop.cfg.optim.clip_grad))
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    if isinstance(loop.task, DINOTask):
        sched["momentum"] = loop.task.update_teacher(step)
        sched["teacher_temp"] = loop.task.teacher_temp(step)
    return {**terms, **sched}


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
    model = wrap_for_ddp(task, ray.train.torch.prepare_model)
    optimizer = build_optimizer(trainable(task), cfg.optim)
    task.train()
    return Loop(cfg, length, task, model, optimizer, build_augment(cfg), device, ctx.get_world_rank())


def restore(loop: Loop) -> dict:
    """State of the checkpoint Ray hands this (re)started worker group, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "samples": 0}
    with checkpoint.as_directory() as d:
        state = ckpt.load(d, loop.rank, loop.task, loop.optimizer)
        metrics = Path(d) / "metrics.csv"
        if loop.rank == 0 and metrics.exists():
            Path(loop_csv(loop)).write_bytes(metrics.read_bytes())
    return state


def data_position(state: dict) -> tuple[int, tuple[int, ...]]:
    """(start, skip) of a checkpoint's state: the samples below `start` and those in `skip` are
    trained on (`fold_consumed`); `samples` counts both."""
    skip = tuple(state.get("skip", ()))
    return state["samples"] - len(skip), skip


def loop_csv(loop: Loop) -> str:
    return str(Path(tempfile.gettempdir()) / f"fmct_metrics_{id(loop)}.csv")


def report(loop: Loop, row: dict, state: dict, final: bool) -> None:
    """Checkpoint on every rank (Ray merges the folders; report() is a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt.save(
            d,
            loop.rank,
            task=loop.task,
            optimizer=loop.optimizer,
            state=state,
            cfg=loop.cfg,
            metrics_csv=loop_csv(loop),
        )
        if final and loop.rank == 0 and loop.cfg.train.export_backbone:
            export_backbone(loop.task, Path(d) / "teacher_backbone.pt")
        metrics = {**row, **{k: v for k, v in state.items() if k != "skip"}}  # skip: in state.json
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def export_backbone(task, path: Path) -> Path:
    """The DINO teacher's (MAE: the encoder's) backbone with its config (`load_backbone` reads it)."""
    from fmct_ray.models import save_backbone

    backbone = task.teacher.backbone if isinstance(task, DINOTask) else task.encoder
    return save_backbone(path, backbone)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config`: {"cfg": PretrainConfig (resolved), "length": RunLength,
    "plan": Plan (the run's scan ids)}."""
    import ray.train

    cfg, length = config["cfg"], config["length"]
    loop = build_loop(cfg, length)
    state = restore(loop)
    world = ray.train.get_context().get_world_size()
    per_rank = cfg.train.batch_size * cfg.train.accum_steps
    # Elastic restarts may change the world size: run what the remaining samples allow.
    start, skip = data_position(state)
    shard = Shard(start, loop.rank, world, per_rank, skip)
    total = state["step"] + shard.rows(length.total_samples) // per_rank
    stop = total if cfg.train.stop_after is None else min(total, cfg.train.stop_after)
    timer = StepTimer()
    batches = iter_shard(
        cfg.data, config["plan"], length.total_samples, shard, cfg.train.batch_size, loop.device
    )
    groups = micro_batches(batches, cfg.train.accum_steps, timer)
    run_steps(loop, groups, timer, state, (stop, total), per_rank * world)


def run_steps(
    loop: Loop, groups, timer: StepTimer, state: dict, stop_total: tuple[int, int], per_step: int
) -> None:
    """Steps `state["step"]` .. `stop`: train, log every `log_every`, checkpoint every
    `checkpoint_every` and at `stop`; the checkpoint at `total` (end of the run) exports the backbone."""
    cfg, step, samples = loop.cfg, state["step"], state["samples"]
    (stop, total), log = stop_total, CSVLog(loop_csv(loop))
    position = data_position(state)
    consumed: list[torch.Tensor] = []  # run indices trained on since the last checkpoint
    while step < stop:
        group = next(groups, None)
        if group is None:
            raise RuntimeError(f"data ran out at step {step} of {total} (rank {loop.rank})")
        row = train_step(loop, group, step)
        consumed += [b["index"] for b in group]
        timer.step()
        step, samples = step + 1, samples + per_step
        new_state = {
            "step": step,
            "samples": samples,
            "epoch": samples / loop.length.samples_per_epoch,
            "total_steps": total,
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
            if loop.rank == 0:
                log.write(row)
                print_progress(row, total)
        if step % cfg.train.checkpoint_every == 0 or step == stop:
            position = fold_consumed(*position, all_ranks(torch.cat(consumed)))
            consumed.clear()
            new_state["skip"] = list(position[1])
            report(loop, row if logged else {}, new_state, final=step == total)
