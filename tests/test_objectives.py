"""Losses, masks, schedules, optimiser helpers and the DINO / MAE tasks on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fmct_ray.config import build
from fmct_ray.models import patchify
from fmct_ray.objectives import (
    VOXELFM_DINO,
    DINOConfig,
    DINOLoss,
    DINOTask,
    IBOTPatchLoss,
    KoLeoLoss,
    MAEConfig,
    MAETask,
    OptimConfig,
    Progress,
    apply_schedule,
    block_mask_3d,
    build_optimizer,
    clip_gradients,
    cosine_schedule,
    entropies,
    ibot_masks,
    layer_id,
    lr_at,
    mae_loss,
    momentum_at,
    param_groups,
    random_masks,
    scaled_lr,
    spread,
    teacher_temp_at,
    weight_decay_at,
)

torch.set_num_threads(2)

SMALL_HEAD = {"head_hidden_dim": 32, "head_bottleneck_dim": 16, "n_prototypes": 64, "ibot_n_prototypes": 48}


# ---- DINO / iBOT / KoLeo / MAE losses ------------------------------------------------------------


def test_dino_loss_is_log_k_for_uniform_outputs():
    k, b = 1000, 4
    loss = DINOLoss(k)
    teacher = [loss.teacher_probs(torch.zeros(b, k), 0.04) for _ in range(2)]
    student = [torch.full((b, k), 3.0) for _ in range(5)]  # constant logits -> uniform
    assert loss(student, teacher).item() == pytest.approx(math.log(k), rel=1e-6)


def test_dino_loss_matches_explicit_pairs_and_skips_same_view():
    torch.manual_seed(0)
    loss = DINOLoss(7, student_temp=0.1)
    loss.center.fill_(0.3)
    t_logits = [torch.randn(3, 7) for _ in range(2)]
    s_logits = [torch.randn(3, 7) for _ in range(4)]
    q = [torch.softmax((t - 0.3) / 0.05, -1) for t in t_logits]
    terms = [
        -(q[i] * torch.log_softmax(s_logits[j] / 0.1, -1)).sum(-1).mean()
        for i in range(2)
        for j in range(4)
        if i != j
    ]
    got = loss(s_logits, [loss.teacher_probs(t, 0.05) for t in t_logits])
    torch.testing.assert_close(got, torch.stack(terms).mean())
    assert len(terms) == 6


def test_dino_centre_after_updates():
    loss = DINOLoss(2, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.3]]))
    loss.update_center(torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(loss.center, torch.tensor([[0.18, 0.27]]))
    assert "center" in dict(loss.named_buffers())


def test_ibot_loss_weights_masked_images_equally_over_all_images():
    """Each masked image weighs 1 / (all global-crop samples), masked or not (DINOv2): uniform
    outputs give log K x the masked fraction (2 of 3 images here), not log K."""
    k = 50
    loss = IBOTPatchLoss(k)
    masks = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    uniform = loss.teacher_probs(torch.zeros(4, k), 0.07)
    assert loss(torch.zeros(4, k), uniform, masks).item() == pytest.approx(2 / 3 * math.log(k), rel=1e-6)
    # token-level CE values: image 0 -> a, image 1 -> b, b, c, image 2 -> none: (a + (2b + c) / 3) / 3
    torch.manual_seed(0)
    s, t = torch.randn(4, k), torch.softmax(torch.randn(4, k), -1)
    ce = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (ce[0] + ce[1:].mean()) / 3
    torch.testing.assert_close(loss(s, t, masks), expected)


def _dinov2_forward_masked(s, t, student_masks_flat, student_temp=0.1):
    """DINOv2's `iBOTPatchLoss.forward_masked` (dinov2/loss/ibot_patch_loss.py), transcribed."""
    loss = torch.sum(t * torch.nn.functional.log_softmax(s / student_temp, dim=-1), dim=-1)
    masks_weight = (
        (1 / student_masks_flat.sum(-1).clamp(min=1.0))
        .unsqueeze(-1)
        .expand_as(student_masks_flat)[student_masks_flat]
    )
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]


def test_ibot_loss_matches_dinov2_with_half_the_images_masked():
    """8 global-crop samples, 4 masked (mask_fraction 0.5): the DINOv2 formula, not 2x it."""
    gen = torch.Generator().manual_seed(0)
    masks = ibot_masks(8, (4, 4, 4), (0.1, 0.5), 0.5, gen)
    assert int((masks.sum(1) > 0).sum()) == 4
    m = int(masks.sum())
    s, t = torch.randn(m, 16, generator=gen), torch.softmax(torch.randn(m, 16, generator=gen) / 0.04, -1)
    got = IBOTPatchLoss(16)(s, t, masks)
    torch.testing.assert_close(got, _dinov2_forward_masked(s, t, masks))


def test_ibot_centre_is_mean_over_masked_tokens():
    loss = IBOTPatchLoss(2, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 0.0], [4.0, 2.0], [0.0, 1.0]]))
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 0.5]]))
    loss.update_center(torch.zeros(0, 2))  # no masked token: unchanged
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 0.5]]))


def test_koleo_known_nearest_neighbour_distances():
    ang = torch.tensor([0.0, 60.0, 180.0]) * math.pi / 180
    pts = torch.stack([ang.cos(), ang.sin()], dim=1)
    # NN distances on the unit circle: 0<->60 deg: 1; 180 -> 60 deg: sqrt(3)
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3))) / 3
    koleo = KoLeoLoss()
    assert koleo(pts).item() == pytest.approx(expected, abs=1e-5)
    assert koleo(pts * 5.0).item() == pytest.approx(expected, abs=1e-5)  # embeddings are L2-normalised
    spread = torch.eye(3)
    assert koleo(spread).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)


def test_mae_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert mae_loss(target.clone(), target, mask).item() == 0.0
    pred = target.clone()
    pred[~mask] += 10.0  # errors on visible patches do not count
    assert mae_loss(pred, target, mask).item() == 0.0
    pred[mask] += 2.0  # every masked voxel off by 2 -> MSE 4
    assert mae_loss(pred, target, mask).item() == pytest.approx(4.0)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae_loss(normed, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-10)


# ---- masking ----------------------------------------------------------------------------------------


def test_random_masks_exact_count():
    gen = torch.Generator().manual_seed(0)
    masks = random_masks(16, 512, 0.75, gen)
    assert masks.shape == (16, 512) and (masks.sum(1) == 384).all()
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == 16  # independent draws


@pytest.mark.parametrize("count", [0, 1, 7, 51, 200, 256, 512])
def test_block_mask_exact_count(count):
    mask = block_mask_3d((8, 8, 8), count, torch.Generator().manual_seed(count))
    assert mask.shape == (512,) and int(mask.sum()) == count


def test_block_masks_are_blocky():
    """Masked patches cluster: far more masked face-neighbours than under uniform masking."""

    def neighbour_pairs(m):
        v = m.reshape(8, 8, 8).float()
        return float(
            (v[1:] * v[:-1]).sum() + (v[:, 1:] * v[:, :-1]).sum() + (v[:, :, 1:] * v[:, :, :-1]).sum()
        )

    gen = torch.Generator().manual_seed(0)
    blocky = sum(neighbour_pairs(block_mask_3d((8, 8, 8), 128, gen)) for _ in range(10))
    uniform = sum(neighbour_pairs(random_masks(1, 512, 0.25, gen)[0]) for _ in range(10))
    assert blocky > 1.5 * uniform


def test_ibot_masks_fraction_and_ratio_range():
    gen = torch.Generator().manual_seed(1)
    masks = ibot_masks(16, (8, 8, 8), (0.1, 0.5), 0.5, gen)
    counts = masks.sum(1)
    assert (counts > 0).sum() == 8
    nonzero = counts[counts > 0].float() / 512
    assert nonzero.min() >= 0.1 - 1 / 512 and nonzero.max() <= 0.5
    assert nonzero.max() - nonzero.min() > 0.2  # ratios spread over the range
    again = ibot_masks(16, (8, 8, 8), (0.1, 0.5), 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)


# ---- schedules and optimiser ------------------------------------------------------------------------


def test_schedules_are_pure_functions_of_samples():
    assert lr_at(0, 100, 1e-3, 1e-6, warmup=10) == 0.0
    assert lr_at(5, 100, 1e-3, 1e-6, warmup=10) == pytest.approx(5e-4)
    assert lr_at(10, 100, 1e-3, 1e-6, warmup=10) == pytest.approx(1e-3)
    assert lr_at(55, 100, 1e-3, 0.0, warmup=10) == pytest.approx(5e-4)
    assert lr_at(100, 100, 1e-3, 1e-6, warmup=10) == 1e-6  # exactly the final values at the total
    assert lr_at(103, 100, 1e-3, 1e-6, warmup=10) == 1e-6 and momentum_at(103, 100) == 1.0
    assert lr_at(100, 100, 1e-3, 1e-6, warmup=200) == 1e-6  # even when the warm-up is longer
    assert Progress(50, 200).fraction == 0.25 and Progress(210, 200).fraction == 1.0
    assert weight_decay_at(0, 100) == pytest.approx(0.04) and weight_decay_at(100, 100) == pytest.approx(0.4)
    assert teacher_temp_at(0, 30) == pytest.approx(0.04)
    assert teacher_temp_at(15, 30) == pytest.approx(0.055)
    assert teacher_temp_at(500, 30) == 0.07
    assert momentum_at(0, 1000) == pytest.approx(0.994) and momentum_at(1000, 1000) == 1.0
    assert momentum_at(500, 1000) == pytest.approx(0.997)
    values = [cosine_schedule(s, 50, 1.0, 0.0) for s in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert scaled_lr(3e-4, 512) == pytest.approx(6e-4)


def test_param_groups_no_decay_and_layer_decay():
    task = DINOTask(DINOConfig(model="vit3d_tiny", **SMALL_HEAD, ibot_weight=1.0))
    groups = param_groups(task.student, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    for name in (
        "backbone.cls_token",
        "backbone.mask_token",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.2.attn.qkv.bias",
        "dino_head.mlp.0.bias",
        "backbone.norm.weight",
    ):
        assert by_name[name]["wd_scale"] == 0.0, name
    for name in (
        "backbone.blocks.0.attn.qkv.weight",
        "dino_head.mlp.0.weight",
        "backbone.patch_embed.proj.weight",
    ):
        assert by_name[name]["wd_scale"] == 1.0, name
    assert "backbone.pos_embed" not in by_name  # frozen sin-cos
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == 0.5**5
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.5**4
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["lr_scale"] == 0.5**1
    assert by_name["dino_head.mlp.0.weight"]["lr_scale"] == 1.0
    assert layer_id("decoder.blocks.1.attn.qkv.weight", 4) == 5
    opt = build_optimizer(task.student, OptimConfig(layer_decay=0.5))
    apply_schedule(opt, lr=1e-3, weight_decay=0.1)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_scale"])


def test_clip_gradients():
    w = nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_gradients([w], 1.0).item() == pytest.approx(5.0)
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    assert clip_gradients([w], 0).item() == pytest.approx(1.0, rel=1e-4)


def test_configs_load_from_yaml_dicts():
    cfg = build(DINOConfig, {"model": "vit3d_tiny", "mask_ratio_range": [0.2, 0.4], "koleo_weight": 0})
    assert cfg.mask_ratio_range == (0.2, 0.4) and cfg.koleo_weight == 0.0
    assert build(MAEConfig, {"mask_ratio": 0.6}).mask_ratio == 0.6
    assert build(OptimConfig, {"betas": [0.9, 0.99]}).betas == (0.9, 0.99)
    assert VOXELFM_DINO.ibot_weight > 0 and VOXELFM_DINO.koleo_weight == 0.1


# ---- tasks ------------------------------------------------------------------------------------------


def _crops(b=2, c=3, g=32, loc=16, n_local=3):
    return [torch.randn(b, c, g, g, g) for _ in range(2)], [
        torch.randn(b, c, loc, loc, loc) for _ in range(n_local)
    ]


def test_dino_task_step_and_teacher_update():
    torch.manual_seed(0)
    task = DINOTask(DINOConfig(model="vit3d_tiny", **SMALL_HEAD, ibot_weight=1.0, koleo_weight=0.1)).train()
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert not task.teacher.training
    for ps, pt in zip(task.student.parameters(), task.teacher.parameters(), strict=True):
        assert torch.equal(ps, pt)
    g, loc = _crops()
    out = task(g, loc, Progress(2, 100))
    assert set(out) == {"loss", "dino", "ibot", "koleo", *MONITORS}
    assert all(torch.isfinite(v) for v in out.values()) and out["ibot"] > 0 and out["koleo"] != 0
    expected = out["dino"] + out["ibot"] + 0.1 * out["koleo"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert task.dino_loss.center.abs().sum() > 0 and task.ibot_loss.center.abs().sum() > 0
    out["loss"].backward()
    for name, p in task.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
    state = task.state_dict()
    assert "dino_loss.center" in state and "ibot_loss.center" in state
    with torch.no_grad():
        for p in task.student.parameters():
            p.fill_(1.0)
        for p in task.teacher.parameters():
            p.zero_()
    logged = task.after_step(Progress(0, 100))
    m = logged["momentum"]
    assert m == pytest.approx(0.994) and logged["teacher_temp"] == 0.04
    for p in task.teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1 - m))


def test_dino_task_freezes_last_layer_and_handles_other_local_sizes():
    cfg = DINOConfig(model="vit3d_voxelfm_tiny", **SMALL_HEAD, freeze_last_layer_samples=4)
    task = DINOTask(cfg).train()
    assert not task.student.backbone.mask_token.requires_grad  # iBOT off: unused
    g, loc = _crops(c=1, g=32, loc=16, n_local=2)
    loc.append(torch.randn(2, 1, 24, 24, 24))  # a third local size
    out = task(g, loc, Progress(4, 100))
    assert out["ibot"] == 0 and out["koleo"] == 0
    out["loss"].backward()
    task.after_backward(Progress(4, 100))  # the second step of batch 2: samples 2, 3 < 4 frozen
    assert task.student.dino_head.last_layer.weight_v.grad is None
    assert task.student.dino_head.mlp[0].weight.grad is not None
    task(g, loc, Progress(6, 100))["loss"].backward()
    task.after_backward(Progress(6, 100))
    assert task.student.dino_head.last_layer.weight_v.grad is not None


def test_dino_task_wrapped_student_keeps_state_keys():
    class Wrapper(nn.Module):  # stands in for DDP: forwards and exposes .module
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args):
            self.calls += 1
            return self.module(*args)

    task = DINOTask(DINOConfig(model="vit3d_tiny", **SMALL_HEAD))
    keys = set(task.state_dict())
    wrapped = task.wrap(Wrapper)
    assert wrapped.module is task.trainable is task.student
    g, loc = _crops()
    task(g, loc, Progress(2, 100))
    assert wrapped.calls == 1 and set(task.state_dict()) == keys
    task.student = Wrapper(task.student)  # plain assignment also works
    task(g, loc, Progress(4, 100))
    assert task.trainable is wrapped.module
    assert task.after_step(Progress(4, 100))["momentum"] < 1.0


def test_dino_task_teacher_temperature_schedule():
    cfg = DINOConfig(model="vit3d_tiny", **SMALL_HEAD, teacher_temp=0.07, warmup_teacher_temp_samples=10)
    task = DINOTask(cfg)
    assert task.teacher_temp(Progress(0, 100)) == pytest.approx(0.04)
    assert task.teacher_temp(Progress(5, 100)) == pytest.approx(0.055)
    assert task.teacher_temp(Progress(10, 100)) == pytest.approx(0.07)


def test_default_teacher_temperature_is_the_safe_one():
    """No recipe gets 0.07 without a warm-up by default: FM-CT's constant 0.04."""
    for cfg in (DINOConfig(), VOXELFM_DINO):
        assert cfg.teacher_temp == cfg.warmup_teacher_temp == 0.04 and cfg.warmup_teacher_temp_samples == 0
    task = DINOTask(DINOConfig(model="vit3d_tiny", **SMALL_HEAD))
    assert task.teacher_temp(Progress(0, 100)) == task.teacher_temp(Progress(100, 100)) == 0.04


MONITORS = ("teacher_entropy", "teacher_marginal_entropy", "student_cls_std", "teacher_cls_std", "log_k")


def test_entropies_of_known_distributions():
    k = 64
    uniform = torch.full((5, k), 1 / k)
    entropy, marginal = entropies(uniform)
    assert entropy.item() == pytest.approx(math.log(k)) and marginal.item() == pytest.approx(math.log(k))
    same = torch.zeros(5, k)
    same[:, 3] = 1.0  # every sample on prototype 3: one-hot and collapsed
    assert entropies(same)[0].item() == 0.0 and entropies(same)[1].item() == 0.0
    distinct = torch.eye(k)[:4]  # one-hot on 4 different prototypes: sharp but spread
    entropy, marginal = entropies(distinct)
    assert entropy.item() == 0.0 and marginal.item() == pytest.approx(math.log(4))
    assert spread(torch.ones(6, 3)).item() == 0.0
    assert spread(torch.tensor([[0.0, 1.0], [2.0, 1.0]])).item() == pytest.approx(math.sqrt(2) / 2)


def test_dino_task_reports_monitors():
    torch.manual_seed(0)
    task = DINOTask(DINOConfig(model="vit3d_tiny", **SMALL_HEAD)).train()
    g, loc = _crops()
    out = task(g, loc, Progress(2, 100))
    assert out["log_k"].item() == pytest.approx(math.log(64))
    assert 0 < out["teacher_entropy"] <= out["teacher_marginal_entropy"] <= math.log(64) + 1e-5
    assert out["student_cls_std"] > 0 and out["teacher_cls_std"] > 0
    assert not any(out[k].requires_grad for k in MONITORS)
    with torch.no_grad():
        expected = task.teacher.backbone.forward_features(torch.cat(g))["cls"].std(0).mean()
    torch.testing.assert_close(out["teacher_cls_std"], expected)


def test_tasks_share_one_interface():
    dino = DINOTask(DINOConfig(model="vit3d_tiny", **SMALL_HEAD))
    mae = MAETask(MAEConfig(model="vit3d_tiny", decoder_dim=48, decoder_depth=1, decoder_heads=4))
    assert dino.trainable is dino.student and mae.trainable is mae.model
    assert dino.backbone_to_export() is dino.teacher.backbone and mae.backbone_to_export() is mae.encoder
    p = Progress(2, 10)
    assert mae.after_step(p) == {} and mae.after_backward(p) is None
    assert set(dino.after_step(p)) == {"momentum", "teacher_temp"}


def test_mae_task_masks_exactly_and_trains_encoder():
    task = MAETask(MAEConfig(model="vit3d_tiny", decoder_dim=48, decoder_depth=1, decoder_heads=4))
    images = torch.rand(2, 3, 32, 32, 32)
    masks = task.sample_masks(images)
    assert (masks.sum(1) == 48).all()
    out = task([images], [], Progress(2, 10))
    assert set(out) == {"loss", "mae"} and out["loss"] > 0
    out["loss"].backward()
    assert task.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :32] = True
    with torch.no_grad():
        pred = task.model(images, mask)
    target = patchify(images, 8)
    tnorm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    manual = ((pred - tnorm) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(task([images], mask=mask)["loss"].detach(), manual)


def test_dino_head_batchnorm_keeps_similar_samples_apart():
    """head_use_bn: a batch whose backbone features barely differ still gets spread-out teacher
    distributions (without it the centred teacher output of such a batch is near uniform)."""
    import math

    from fmct_ray.objectives import DINOConfig, DINOTask, entropies

    def teacher_entropy(use_bn: bool) -> float:
        torch.manual_seed(0)
        task = DINOTask(
            DINOConfig(
                model="vit3d_tiny",
                head_hidden_dim=64,
                head_bottleneck_dim=32,
                n_prototypes=128,
                head_use_bn=use_bn,
            )
        ).train()
        x = 0.5 + 1e-3 * torch.randn(8, 3, 32, 32, 32)  # near-identical inputs
        assert (
            any(isinstance(m, torch.nn.BatchNorm1d) and m.training for m in task.teacher.modules()) == use_bn
        )
        logits = task.teacher.forward_teacher([x])["cls_logits"]
        task.dino_loss.center.copy_(logits.mean(0, keepdim=True))  # a centre that has caught up
        probs = task.dino_loss.teacher_probs(logits, 0.04)
        return float(entropies(probs)[0]) / math.log(128)

    assert teacher_entropy(False) > 0.99
    assert teacher_entropy(True) < 0.9
