"""Toy self-supervised training on synthetic volumes: loss curves and collapse diagnostics.

Trains `vit3d_tiny` with DINO (+ iBOT + KoLeo) and with MAE for a few hundred CPU steps on a pool
of 64 synthetic heads (`fmct_ray.synthetic`: per-scan anatomy, planted findings) on a coarse 48^3
grid of 4 mm voxels (192 mm: the head and little air, as the recipes' foreground-fitted boxes see
it), mapped to FM-CT's three HU windows by `GPUAugment`; random cubic crops (resized; flipped for
MAE) are the views. It logs per step the loss, the teacher's per-sample entropy and marginal (batch-mean)
entropy of prototype probabilities, and the per-dimension standard deviation of teacher CLS
embeddings across the batch. Collapse shows as marginal entropy -> 0 (one prototype for
everything) or per-sample entropy -> log K (uniform outputs) together with embedding std -> 0.

    .venv/bin/python bench/ssl_curves.py --steps 300 --out docs/img

`tests/test_ssl_convergence.py` imports `train_dino` / `train_mae` from this file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmct_ray.data.augment import FMCT_WINDOWS, AugmentConfig, GPUAugment
from fmct_ray.objectives import DINOConfig, DINOTask, MAEConfig, MAETask, OptimConfig, Progress, entropies
from fmct_ray.objectives.optim import apply_schedule, build_optimizer, clip_gradients
from fmct_ray.objectives.schedules import lr_at, weight_decay_at
from fmct_ray.synthetic import synthetic_scan, to_int16

TOY_DINO = DINOConfig(  # configs/pretrain/cpu_dino_tiny.yaml's head and teacher, with iBOT and KoLeo
    model="vit3d_tiny",
    head_hidden_dim=256,
    head_bottleneck_dim=64,
    head_use_bn=True,
    n_prototypes=256,
    ibot_n_prototypes=256,
    ibot_weight=1.0,
    koleo_weight=0.1,
    teacher_temp=0.04,
    momentum_teacher=0.99,
)
TOY_MAE = MAEConfig(model="vit3d_tiny", decoder_dim=96, decoder_depth=2, decoder_heads=4, norm_pix_loss=False)


def heads(n: int, side: int, seed: int, channels: int = 3, fov_mm: float = 192.0) -> torch.Tensor:
    """n synthetic heads (`fmct_ray.synthetic.synthetic_scan`, each finding at prevalence 0.4) on a
    side^3 grid spanning `fov_mm`, int16 HU mapped to the first `channels` FM-CT windows (brain,
    subdural, bone) by `GPUAugment` with no random augmentation: (n, channels, side^3) in [0, 1].
    Scan `i` depends on (seed, i) only."""
    grid, spacing = (side,) * 3, (fov_mm / side,) * 3
    hu = np.stack(
        [
            to_int16(synthetic_scan(np.random.default_rng([seed, i]), 0.4, grid, spacing=spacing).volume)
            for i in range(n)
        ]
    )
    off = dict(flip_prob=0.0, shift_prob=0.0, smooth_prob=0.0, gamma_prob=0.0)
    return GPUAugment(AugmentConfig(windows=FMCT_WINDOWS[:channels], **off))(torch.from_numpy(hu))


def random_crop(vols: torch.Tensor, scale: tuple[float, float], out: int, gen: torch.Generator, flips=True):
    """Per-sample random cubic box of side fraction in `scale`, resized to out^3 (and randomly
    flipped along each axis with `flips`)."""
    side = vols.shape[-1]
    crops = []
    for v in vols:
        s = max(2, int(side * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen)))))
        o = [int(torch.randint(side - s + 1, (), generator=gen)) for _ in range(3)]
        box = v[:, o[0] : o[0] + s, o[1] : o[1] + s, o[2] : o[2] + s]
        box = F.interpolate(box[None], size=(out,) * 3, mode="trilinear", align_corners=False)[0]
        for axis in (1, 2, 3):
            if flips and torch.rand((), generator=gen) < 0.5:
                box = box.flip(axis)
        crops.append(box)
    return torch.stack(crops)


def _optimizer(module: torch.nn.Module, lr: float):
    cfg = OptimConfig(lr=lr, weight_decay=0.04, weight_decay_end=0.1, clip_grad=3.0)
    return cfg, build_optimizer(module, cfg)


def train_dino(
    steps: int = 300, batch: int = 16, seed: int = 0, cfg: DINOConfig = TOY_DINO, lr: float = 1e-3
) -> dict:
    """Train the toy DINO task; returns per-step lists (loss, dino, ibot, koleo, entropies, std).

    The views are those of the CPU recipe: two of nearly the whole head (boxes of 85-100% of the
    field), no flips, no local crops. On these heads smaller boxes, local crops, flips or batch 8
    leave the teacher near-uniform for all 300 steps (docs/models.md)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    task = DINOTask(cfg).train()
    ocfg, opt = _optimizer(task.student, lr=lr)
    pool = heads(64, 48, seed)
    log = {k: [] for k in ("loss", "dino", "ibot", "koleo", "entropy", "marginal_entropy", "embed_std")}
    for step in range(steps):
        vols = pool[torch.randint(len(pool), (batch,), generator=gen)]
        g = [random_crop(vols, (0.85, 1.0), 32, gen, flips=False) for _ in range(2)]
        apply_schedule(
            opt, lr_at(step, steps, ocfg.lr, 1e-5, steps // 10), weight_decay_at(step, steps, 0.04, 0.1)
        )
        p = Progress((step + 1) * batch, steps * batch)
        out = task(g, [], p)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        task.after_backward(p)
        clip_gradients(task.student.parameters(), ocfg.clip_grad)
        opt.step()
        task.after_step(p)
        with torch.no_grad():
            probs = task.teacher_probs(g, p)["cls"]
            ent, marg = (float(h) for h in entropies(probs))
            std = task.teacher.backbone.forward_features(g[0])["cls"].std(0).mean()
        for k in ("loss", "dino", "ibot", "koleo"):
            log[k].append(float(out[k].detach()))
        log["entropy"].append(ent)
        log["marginal_entropy"].append(marg)
        log["embed_std"].append(float(std))
    log["log_k"] = math.log(cfg.n_prototypes)
    return log


def train_mae(
    steps: int = 300, batch: int = 8, seed: int = 0, cfg: MAEConfig = TOY_MAE, lr: float = 1.5e-3
) -> dict:
    """Train the toy MAE task; returns per-step lists (loss, embed_std of encoder CLS)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    task = MAETask(cfg).train()
    ocfg, opt = _optimizer(task.model, lr=lr)
    pool = heads(64, 48, seed)
    log = {"loss": [], "embed_std": []}
    for step in range(steps):
        vols = random_crop(pool[torch.randint(len(pool), (batch,), generator=gen)], (0.6, 1.0), 32, gen)
        apply_schedule(opt, lr_at(step, steps, ocfg.lr, 1e-5, steps // 20), 0.05)
        out = task([vols])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        clip_gradients(task.model.parameters(), ocfg.clip_grad)
        opt.step()
        log["loss"].append(float(out["loss"].detach()))
        with torch.no_grad():
            log["embed_std"].append(float(task.encoder.forward_features(vols)["cls"].std(0).mean()))
    return log


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [
        sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
        for i in range(len(values))
    ]


def plot(dino: dict, mae: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for k in ("loss", "dino", "ibot", "koleo"):
        ax[0].plot(_smooth(dino[k]), label=k)
    ax[0].set(title="DINO task losses (10-step mean)", xlabel="step")
    ax[0].legend()
    ax[1].plot(dino["entropy"], label="per-sample entropy")
    ax[1].plot(dino["marginal_entropy"], label="marginal entropy")
    ax[1].axhline(dino["log_k"], ls="--", c="gray", label="log K (uniform)")
    ax[1].set(title="teacher output entropy (nats)", xlabel="step")
    ax[1].legend()
    ax[2].plot(dino["embed_std"])
    ax[2].set(title="teacher CLS std across batch", xlabel="step")
    fig.tight_layout()
    paths = [out / "models_dino_curves.png"]
    fig.savefig(paths[0], dpi=110)
    fig, ax = plt.subplots(1, 2, figsize=(9.5, 3.8))
    ax[0].plot(mae["loss"], alpha=0.4, label="loss")
    ax[0].plot(_smooth(mae["loss"]), label="10-step mean")
    ax[0].set(title="MAE loss (masked patches)", xlabel="step")
    ax[0].legend()
    ax[1].plot(mae["embed_std"])
    ax[1].set(title="encoder CLS std across batch", xlabel="step")
    fig.tight_layout()
    paths.append(out / "models_mae_curves.png")
    fig.savefig(paths[1], dpi=110)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    dino = train_dino(args.steps)
    t1 = time.time()
    mae = train_mae(args.steps)
    t2 = time.time()
    paths = plot(dino, mae, args.out)
    summary = {
        "steps": args.steps,
        "dino_seconds": round(t1 - t0, 1),
        "mae_seconds": round(t2 - t1, 1),
        "dino_loss_first20": sum(dino["loss"][:20]) / 20,
        "dino_loss_last20": sum(dino["loss"][-20:]) / 20,
        "teacher_entropy_last": dino["entropy"][-1],
        "teacher_marginal_entropy_last": dino["marginal_entropy"][-1],
        "log_k": dino["log_k"],
        "teacher_embed_std_first/last": (dino["embed_std"][0], dino["embed_std"][-1]),
        "mae_loss_first20": sum(mae["loss"][:20]) / 20,
        "mae_loss_last20": sum(mae["loss"][-20:]) / 20,
        "mae_embed_std_last": mae["embed_std"][-1],
        "figures": [str(p) for p in paths],
    }
    print(json.dumps(summary, indent=2))
    (args.out / "models_ssl_curves.json").write_text(
        json.dumps({"summary": summary, "dino": dino, "mae": mae})
    )


if __name__ == "__main__":
    main()
