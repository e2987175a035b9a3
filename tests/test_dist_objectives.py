"""2-rank gloo group (no Ray): the losses' global statistics equal one process on the whole batch.

Each rank computes on its half of a fixed batch; the parent compares with single-process results
on the concatenated batch: DINO centre and loss, iBOT centre (uneven masked-token counts per
rank), KoLeo value and gradients, and one DDP-wrapped DINOTask step (identical student grads).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from fmct_ray.objectives import DINOConfig, DINOLoss, DINOTask, IBOTPatchLoss, KoLeoLoss, Progress

K, B = 11, 6  # prototypes, global batch (3 per rank)
TINY = DINOConfig(
    model="vit3d_tiny", head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=64, koleo_weight=0.1
)


def _data():
    gen = torch.Generator().manual_seed(0)
    return {
        "teacher": torch.randn(B, K, generator=gen),
        "students": [torch.randn(B, K, generator=gen) for _ in range(3)],
        "patch": torch.randn(10, K, generator=gen),  # rank 0 owns 3 tokens, rank 1 owns 7
        "emb": torch.randn(B, 5, generator=gen),
        "crops": [torch.randn(B, 3, 32, 32, 32, generator=gen) for _ in range(2)],
        "local": [torch.randn(B, 3, 16, 16, 16, generator=gen)],
    }


def _compute(data, rows, patch_rows):
    """Everything a rank (or the single process, with all rows) reports."""
    out = {}
    dino = DINOLoss(K)
    teacher = [dino.teacher_probs(data["teacher"][rows], 0.04)]
    out["dino"] = dino([s[rows] for s in data["students"]], teacher)
    dino.update_center(data["teacher"][rows])
    out["center"] = dino.center.clone()
    ibot = IBOTPatchLoss(K)
    ibot.update_center(data["patch"][patch_rows])
    out["ibot_center"] = ibot.center.clone()
    emb = data["emb"][rows].clone().requires_grad_(True)
    out["koleo"] = KoLeoLoss()(emb)
    out["koleo"].backward()
    out["koleo_grad"] = emb.grad
    out["koleo"] = out["koleo"].detach()
    return out


def _task_grads(data, rows, wrap):
    torch.manual_seed(0)
    task = DINOTask(TINY).train()
    task.mask_generator.manual_seed(0)
    if wrap:
        task.wrap(lambda m: DDP(m))
    out = task([c[rows] for c in data["crops"]], [c[rows] for c in data["local"]], Progress(B, 10 * B))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in task.student.named_parameters() if p.grad is not None}
    return grads, task.dino_loss.center.clone()


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _data()
        rows = slice(rank * B // world, (rank + 1) * B // world)
        patch_rows = slice(0, 3) if rank == 0 else slice(3, 10)
        out = _compute(data, rows, patch_rows)
        out["task_grads"], out["task_center"] = _task_grads(data, rows, wrap=True)
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    return [torch.load(path / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(2)
    return _compute(_data(), slice(0, B), slice(0, 10))


def test_dino_centre_and_loss_match_one_process(ranks, single):
    for r in ranks:
        torch.testing.assert_close(r["center"], single["center"])
    torch.testing.assert_close((ranks[0]["dino"] + ranks[1]["dino"]) / 2, single["dino"])


def test_ibot_centre_matches_one_process_with_uneven_token_counts(ranks, single):
    for r in ranks:
        torch.testing.assert_close(r["ibot_center"], single["ibot_center"])


def test_koleo_value_and_grad_match_one_process(ranks, single):
    torch.testing.assert_close((ranks[0]["koleo"] + ranks[1]["koleo"]) / 2, single["koleo"])
    # rank grads hold the sum over ranks' losses; DDP then averages -> grad of the global mean
    grad = torch.cat([ranks[0]["koleo_grad"], ranks[1]["koleo_grad"]]) / 2
    torch.testing.assert_close(grad, single["koleo_grad"])


def test_ddp_dino_task_step_is_synchronised(ranks):
    g0, g1 = ranks[0]["task_grads"], ranks[1]["task_grads"]
    assert set(g0) == set(g1) and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], msg=name)
    torch.testing.assert_close(ranks[0]["task_center"], ranks[1]["task_center"])
    _, full_center = _task_grads(_data(), slice(0, B), wrap=False)
    torch.testing.assert_close(ranks[0]["task_center"], full_center, atol=1e-5, rtol=1e-4)
