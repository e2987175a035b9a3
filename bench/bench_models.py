"""Benchmark one DINO training step of the FM-CT backbone (SPEC 2 / 6).

A step = teacher forward on the global crops + student forward and backward on all crops
(2 global + 3 local, all 96^3 by default, 65,536 prototypes) + AdamW step + EMA teacher update.

    # CPU: forward+backward time and peak memory at batch 2
    .venv/bin/python bench/bench_models.py --device cpu --batch 2 --threads 2
    # GPU: step time, scans/s and model FLOP utilisation in bf16 at batch 64
    python bench/bench_models.py --device cuda --batch 64

Model FLOPs are counted analytically (matmuls and attention, 3x forward for forward+backward,
teacher forward only), the convention of the MFU literature; `--count-flops` cross-checks them
with `torch.utils.flop_counter` on the real step. MFU = model FLOPs / step time / peak bf16
FLOP/s of the device (dense; H100/H200 SXM 989 TFLOP/s, A100 312; `--peak-tflops` overrides).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from fmct_ray.models import ViT3DConfig
from fmct_ray.objectives import DINOConfig, DINOTask, OptimConfig, Progress, build_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def vit_forward_flops(c: ViT3DConfig, side: int) -> float:
    """Forward FLOPs of the backbone on one side^3 crop (2 per multiply-add)."""
    n = (side // c.patch_size) ** 3
    t = n + 1 + c.num_registers
    d, h = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    per_block = 2 * t * (3 * d * d + d * d + 2 * d * h) + 4 * t * t * d
    return 2 * n * c.in_chans * c.patch_size**3 * d + c.depth * per_block


def head_forward_flops(cfg: DINOConfig, d: int) -> float:
    c = cfg
    dims = [d] + [c.head_hidden_dim] * (c.head_nlayers - 1) + [c.head_bottleneck_dim, c.n_prototypes]
    return 2 * sum(a * b for a, b in zip(dims, dims[1:], strict=False))


def dino_step_flops(
    task: DINOTask, batch: int, n_global: int, n_local: int, g_side: int, l_side: int
) -> float:
    """Model FLOPs of one step: student 3x forward on every crop, teacher 1x forward on globals."""
    c = task.student_module.backbone.config
    head = head_forward_flops(task.cfg, c.embed_dim)
    glob = vit_forward_flops(c, g_side) + head
    loc = vit_forward_flops(c, l_side) + head
    return batch * (3 * (n_global * glob + n_local * loc) + n_global * glob)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def make_step(task: DINOTask, opt: torch.optim.Optimizer, device: torch.device, amp: bool, total: int):
    """A closure running one full training step on fixed random crops (step i of `total`)."""

    def step(crops, i: int) -> float:
        g, loc = crops
        p = Progress(i + 1, total)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = task(g, loc, p)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        task.after_backward(p)
        torch.nn.utils.clip_grad_norm_(task.student.parameters(), 3.0)
        opt.step()
        task.after_step(p)
        return float(out["loss"].detach())

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = DINOTask(DINOConfig(model=args.model)).to(device).train()
    opt = build_optimizer(task.student, OptimConfig())
    c = task.student_module.backbone.config
    mk = lambda s, n: [torch.rand(args.batch, c.in_chans, s, s, s, device=device) for _ in range(n)]  # noqa: E731
    crops = (mk(args.global_side, args.n_global), mk(args.local_side, args.n_local))
    if args.compile:
        task.wrap(torch.compile)
    amp = device.type == "cuda" and not args.fp32
    step = make_step(task, opt, device, amp=amp, total=args.warmup + args.steps)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(args.warmup):
        step(crops, i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(crops, args.warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = dino_step_flops(task, args.batch, args.n_global, args.n_local, args.global_side, args.local_side)
    sec = sorted(times)[len(times) // 2]
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU x{args.threads} threads",
        "host": platform.node(),
        "model": args.model,
        "batch": args.batch,
        "crops": f"{args.n_global}x{args.global_side}^3 + {args.n_local}x{args.local_side}^3",
        "precision": "bf16 autocast" if device.type == "cuda" and not args.fp32 else "fp32",
        "step_s_median": round(sec, 3),
        "step_s_all": [round(t, 3) for t in times],
        "scans_per_s": round(args.batch / sec, 2),
        "model_tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / sec / 1e12, 3),
    }
    peak = peak_tflops(device, args.peak_tflops)
    if peak:
        result["mfu"] = round(flops / sec / 1e12 / peak, 4)
        result["peak_bf16_tflops"] = peak
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result["rss_before_steps_gib"] = round(rss0 / 2**20, 2)
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step(crops, 0)
        result["counted_tflop_per_step"] = round(counter.get_total_flops() / 1e12, 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="vit3d_base")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 64 on GPU")
    p.add_argument("--n-global", type=int, default=2)
    p.add_argument("--n-local", type=int, default=3)
    p.add_argument("--global-side", type=int, default=96)
    p.add_argument("--local-side", type=int, default=96)
    p.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 5 on GPU")
    p.add_argument("--steps", type=int, default=None, help="default: 3 on CPU, 20 on GPU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the student")
    p.add_argument("--count-flops", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (64 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.steps = args.steps or (20 if gpu else 3)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
