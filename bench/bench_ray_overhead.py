"""Benchmark 2 (issue 4): step time of the Ray Train loop against a plain PyTorch loop.

Both loops run the same recipe, model, initial weights and samples, with the same number of
torch threads, on one worker, one after the other in one process tree on the same cores:

  plain  `fmct_ray.train.pretrain.train_step` in a Python loop over batches cut beforehand and
         held in memory (the same `VolumeReader` views the Ray run streams): no Ray, no data cost.
  ray    `fmct_ray.train.trainer.pretrain` with one worker: TorchTrainer, the streaming Ray Data
         source (reader actors on the other cores), `iter_torch_batches`, per-step metrics
         (a CSV row and a console line every step), a checkpoint at the end.

Step time: median over the steps after `--warmup`; the Ray loop's comes from its own metrics
(`step_s`: wall time of a step including the wait for data). Ratio = ray / plain.

Benchmark 3 uses the same script on a GPU: `--device cuda --recipe configs/pretrain/fmct_dino_vitb.yaml`
reports the Ray loop's scans/s and data-wait fraction (set `--batch`, `--readers` for the machine).

    python bench/bench_ray_overhead.py [--recipe configs/pretrain/debug_dino_tiny.yaml] [--steps 30]
        [--set KEY=VALUE ...] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fmct_ray import config as config_lib
from fmct_ray.data.source import VolumeReader, make_plan
from fmct_ray.objectives import Progress, build_optimizer
from fmct_ray.synthetic import write_store
from fmct_ray.train.pretrain import (
    Loop,
    PretrainConfig,
    build_augment,
    build_task,
    resolve,
    run_length,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(args: argparse.Namespace, store: str) -> PretrainConfig:
    overrides = [
        f"data.sites=[{{name: bench, uri: '{store}'}}]",
        f"train.max_steps={args.warmup + args.steps}",
        "train.log_every=1",
        f"train.checkpoint_every={10**6}",
        "train.export_backbone=false",
        "data.preserve_order=true",
        f"data.readers={args.readers}",
        f"data.cpus_per_reader={args.cpus_per_reader}",
        *([f"train.batch_size={args.batch}"] if args.batch else []),
        *args.set,
    ]
    return config_lib.load(PretrainConfig, args.recipe, overrides)


def plain_loop(cfg: PretrainConfig, steps: int, device: torch.device) -> list[float]:
    """Seconds per optimiser step of train_step over in-memory batches (the Ray run's samples)."""
    plan = make_plan(cfg.data)
    length = run_length(cfg, plan.samples_per_epoch, world_size=1)
    resolved = resolve(cfg, length)
    reader = VolumeReader(plan, cfg.data.crops)
    b, k = cfg.train.batch_size, cfg.train.accum_steps
    batches = []
    for s in range(steps * k):
        views = reader({"id": np.arange(s * b, (s + 1) * b)})
        batches.append({key: torch.from_numpy(v).to(device) for key, v in views.items()})
    task = build_task(resolved).to(device)
    optimizer = build_optimizer(task.trainable, resolved.optim)
    task.train()
    loop = Loop(resolved, length, task, task.trainable, optimizer, build_augment(resolved), device)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        progress = Progress((step + 1) * loop.global_batch, length.total_samples)
        train_step(loop, batches[step * k : (step + 1) * k], step, progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def ray_loop(cfg: PretrainConfig, use_gpu: bool) -> list[dict]:
    """Metrics rows (one per step) of a 1-worker Ray Train run of `cfg`."""
    from fmct_ray.train.trainer import LaunchConfig, pretrain

    launch = LaunchConfig(
        name=f"overhead-{time.time_ns()}",
        storage_path=tempfile.mkdtemp(prefix="bench_"),
        num_workers=1,
        use_gpu=use_gpu,
        cpus_per_worker=1.0,
        max_failures=0,
    )
    result = pretrain(cfg, launch)
    if result.error:
        raise result.error
    with open(Path(result.checkpoint.path) / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def machine() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
        platform.processor(),
    )
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} vCPU {cpu}{gpu}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "configs" / "pretrain" / "debug_dino_tiny.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--batch", type=int, help="samples per step (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training loop")
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--cpus-per-reader", type=float, default=0.5)
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--store", help="existing store (default: a synthetic one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip-plain", action="store_true", help="Ray loop only (benchmark 3)")
    p.add_argument("--json")
    args = p.parse_args()

    import ray

    store = args.store or str(Path(tempfile.mkdtemp(prefix="bench_store_")) / "site")
    if not args.store:
        write_store(store, args.volumes, site="bench")
    cfg = load_recipe(args, store)
    if args.device == "cpu":
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=False))
    torch.set_num_threads(args.threads)
    out: dict = {
        "machine": machine(),
        "recipe": args.recipe,
        "overrides": args.set,
        "threads": args.threads,
        "load_before": os.getloadavg(),
    }
    if not args.skip_plain:
        plain = plain_loop(cfg, args.warmup + args.steps, torch.device(args.device))
        out["plain_step_s"] = statistics.median(plain[args.warmup :])
        print(f"plain: median step {out['plain_step_s']:.4f} s", flush=True)
    ray.init(
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}},
    )
    try:
        rows = ray_loop(cfg, use_gpu=args.device == "cuda")[args.warmup :]
    finally:
        ray.shutdown()
    out["ray_step_s"] = statistics.median(r["step_s"] for r in rows)
    out["ray_scans_per_s"] = statistics.median(r["scans_per_s"] for r in rows)
    out["ray_data_wait_frac"] = statistics.mean(r["data_wait_frac"] for r in rows)
    out["load_after"] = os.getloadavg()
    if "plain_step_s" in out:
        out["ratio"] = out["ray_step_s"] / out["plain_step_s"]
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
