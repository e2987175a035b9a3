"""Backbones, position encodings, heads and MAE model: shapes, gradients, parameter counts, numerics."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fmct_ray.models import (
    Attention,
    AttentiveProbe,
    DINOHead,
    LinearProbe,
    MaskedAutoencoder3D,
    apply_rope,
    create_model,
    list_models,
    load_backbone,
    model_config,
    normalized_coords,
    patchify,
    rope_periods,
    rope_sincos,
    save_backbone,
    sincos_3d,
    unpatchify,
)

torch.set_num_threads(2)

# preset -> small input (B, C, side) that keeps the test fast; sides are multiples of the patch.
SMALL_INPUTS = {
    "vit3d_tiny": (2, 3, 32),
    "vit3d_tiny_p4": (2, 3, 16),
    "vit3d_small": (1, 3, 24),
    "vit3d_base": (1, 3, 24),
    "vit3d_voxelfm_base": (1, 1, 28),
    "vit3d_voxelfm_tiny": (2, 1, 32),
}


def _vit_params(c) -> int:
    """Closed-form parameter count of a ViT3DConfig (independent of the module code)."""
    d, hidden = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    block = 4 * d * d + 4 * d + 2 * d * hidden + hidden + d + 4 * d
    block += 2 * d if c.layerscale_init else 0
    n_tokens = (c.img_size // c.patch_size) ** 3
    pos = (1 + n_tokens) * d if c.pos_embed in ("sincos", "learned") else 0
    embed = c.in_chans * c.patch_size**3 * d + d
    return embed + c.depth * block + pos + d * (2 + c.num_registers) + 2 * d  # cls, mask, regs, norm


def test_every_preset_is_tested():
    assert sorted(SMALL_INPUTS) == list_models()


BIG = {"vit3d_small", "vit3d_base", "vit3d_voxelfm_base"}
PRESET_CASES = [pytest.param(n, None, id=n) for n in sorted(SMALL_INPUTS) if n not in BIG]
# big presets: full depth in the slow tier; by default the same widths, patch and extras at depth 2
PRESET_CASES += [pytest.param(n, 2, id=f"{n}-depth2") for n in sorted(BIG)]
PRESET_CASES += [pytest.param(n, None, id=n, marks=pytest.mark.slow) for n in sorted(BIG)]


@pytest.mark.parametrize(("name", "depth"), PRESET_CASES)
def test_preset_forward_backward_grads_everywhere(name, depth):
    b, c, side = SMALL_INPUTS[name]
    overrides = {"drop_path_rate": 0.0} | ({"depth": depth} if depth else {})
    model = create_model(name, **overrides)  # no dropped branch -> every grad non-zero
    grid = side // model.patch_size
    x = torch.randn(b, c, side, side, side)
    mask = torch.zeros(b, grid**3, dtype=torch.bool)
    mask[:, 0] = True  # exercises the mask token
    out = model.forward_features(x, mask)
    assert out["cls"].shape == (b, model.embed_dim)
    assert out["patch"].shape == (b, grid**3, model.embed_dim)  # registers excluded
    (out["cls"].pow(2).sum() + out["patch"].pow(2).sum()).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["vit3d_tiny", "vit3d_small", "vit3d_base", "vit3d_voxelfm_base"])
def test_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == _vit_params(model.config)
    if name == "vit3d_base":  # SPEC 2: about 89.4 M parameters
        assert abs(n - 89.4e6) / 89.4e6 < 0.02


def test_presets_match_spec():
    base = model_config("vit3d_base")
    assert (base.in_chans, base.img_size, base.patch_size) == (3, 96, 12)
    assert (base.embed_dim, base.depth, base.num_heads, base.embed_dim * base.mlp_ratio) == (
        768,
        12,
        12,
        3072,
    )
    assert base.pos_embed == "sincos" and (base.img_size // base.patch_size) ** 3 == 512
    vfm = model_config("vit3d_voxelfm_base")
    assert (vfm.in_chans, vfm.patch_size, vfm.embed_dim, vfm.depth, vfm.num_heads) == (1, 14, 864, 12, 12)
    assert (vfm.pos_embed, vfm.rope_base, vfm.num_registers) == ("rope", 100.0, 4)
    assert (vfm.layerscale_init, vfm.drop_path_rate) == (1e-5, 0.1)
    assert model_config("vit3d_base", drop_path_rate=0.2).drop_path_rate == 0.2
    with pytest.raises(KeyError):
        create_model("vit3d_huge")


def test_tiny_forward_backward_under_a_second():
    model = create_model("vit3d_tiny")
    x = torch.randn(2, 3, 32, 32, 32)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        model.forward_features(x)["cls"].sum().backward()
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0


def test_sincos_values_at_chosen_positions():
    dim, grid = 12, (2, 3, 4)
    emb = sincos_3d(dim, grid, cls_token=True)
    assert emb.shape == (1 + 24, dim) and emb[0].abs().sum() == 0
    # token at (d, h, w) = (1, 2, 3) is row 1 + 1*12 + 2*4 + 3; 4 channels per axis with w = (1, 1/100)
    row = emb[1 + 23]
    expected = []
    for p in (1, 2, 3):
        expected += [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
    torch.testing.assert_close(row, torch.tensor(expected), atol=1e-6, rtol=0)
    odd = sincos_3d(512, (2, 2, 2))  # MAE decoder width, not divisible by 6
    assert odd.shape == (8, 512) and torch.isfinite(odd).all()


def test_rope_preserves_norms_and_is_shift_invariant():
    torch.manual_seed(0)
    head_dim, n = 24, 10
    q, k = torch.randn(1, 2, n, head_dim), torch.randn(1, 2, n, head_dim)
    coords = torch.rand(n, 3) * 2 - 1
    periods = rope_periods(head_dim, base=100.0)

    def scores(c):
        sin, cos = rope_sincos(c, periods)
        qr, kr = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        return qr, qr @ kr.transpose(-2, -1)

    qr, s0 = scores(coords)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    _, s_shift = scores(coords + torch.tensor([0.3, -0.7, 1.1]))
    torch.testing.assert_close(s_shift, s0, atol=1e-4, rtol=1e-4)
    _, s_scaled = scores(coords * 1.5)  # not a common shift: scores must change
    assert (s_scaled - s0).abs().max() > 1e-2


def test_rope_coords_normalised_for_any_grid():
    for grid in [(2, 3, 4), (8, 8, 8)]:
        c = normalized_coords(grid)
        assert c.shape == (math.prod(grid), 3)
        assert c.min() > -1 and c.max() < 1
        torch.testing.assert_close(c.mean(0), torch.zeros(3), atol=1e-6, rtol=0)


def test_attention_weights_path_matches_sdpa():
    torch.manual_seed(0)
    attn = Attention(48, 4)
    x = torch.randn(2, 1 + 8, 48)
    sin, cos = rope_sincos(normalized_coords((2, 2, 2)), rope_periods(12))
    for rope in (None, (sin[None, None], cos[None, None])):
        fast = attn(x, rope)
        slow, weights = attn(x, rope, return_attention=True)
        torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


def test_get_attention_maps_shapes():
    model = create_model("vit3d_voxelfm_tiny").eval()
    maps = model.get_attention_maps(torch.randn(1, 1, 32, 32, 32))
    assert len(maps) == model.num_blocks
    t = 1 + model.num_registers + 64
    assert maps[0].shape == (1, model.num_heads, t, t)
    assert model.num_prefix_tokens == 5


def test_pos_embed_interpolates_to_other_sizes():
    model = create_model("vit3d_tiny").eval()
    out = model.forward_features(torch.randn(1, 3, 48, 32, 16))  # grid (6, 4, 2)
    assert out["patch"].shape == (1, 48, model.embed_dim)
    with pytest.raises(ValueError):
        model.forward_features(torch.randn(1, 3, 30, 32, 32))  # not a multiple of the patch


def test_mask_token_and_dropped_tokens():
    torch.manual_seed(0)
    for name in ("vit3d_tiny", "vit3d_voxelfm_tiny"):
        model = create_model(name).eval()
        c = model.in_chans
        x = torch.randn(2, c, 32, 32, 32)
        none = torch.zeros(2, 64, dtype=torch.bool)
        torch.testing.assert_close(model.forward_features(x, none)["cls"], model.forward_features(x)["cls"])
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[0, :16], mask[1, 40:56] = True, True
        y = x.clone()
        y[:, :, :8, :16] += 5.0  # changes only patches 0..7 of grid row 0 -> all masked in sample 0
        dropped = model.forward_features(x, mask, drop_masked=True)
        assert dropped["patch"].shape == (2, 48, model.embed_dim)
        again = model.forward_features(y, mask, drop_masked=True)
        torch.testing.assert_close(again["patch"][0], dropped["patch"][0])  # masked content is invisible
        assert (again["patch"][1] - dropped["patch"][1]).abs().max() > 1e-3  # sample 1 sees those patches
        tok = model.forward_features(y, mask)
        torch.testing.assert_close(tok["patch"][0], model.forward_features(x, mask)["patch"][0])
        uneven = mask.clone()
        uneven[0, 20] = True
        with pytest.raises(ValueError):
            model.forward_features(x, uneven, drop_masked=True)


def test_save_and_load_backbone_roundtrip(tmp_path):
    model = create_model("vit3d_voxelfm_tiny", drop_path_rate=0.0).eval()
    path = save_backbone(tmp_path / "sub" / "teacher.pt", model)
    loaded = load_backbone(path).eval()
    assert loaded.config == model.config
    x = torch.randn(1, 1, 32, 32, 32)
    torch.testing.assert_close(loaded.forward_features(x)["patch"], model.forward_features(x)["patch"])
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        load_backbone(tmp_path / "bad.pt")


def test_dino_head_weight_norm_and_shapes():
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, 32)
    out = head(x)
    assert out.shape == (5, 100)
    assert out.abs().max() <= 1.0 + 1e-5  # unit-norm bottleneck . unit-norm prototypes = cosine
    assert not head.last_layer.weight_g.requires_grad
    head.last_layer.weight_v.data.mul_(7.0)  # scale of v is irrelevant under weight norm
    torch.testing.assert_close(head(x), out)
    free = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad


def test_linear_probe_is_non_affine_bn_plus_linear():
    probe = LinearProbe(16, 2)
    assert not any("norm" in n for n, _ in probe.named_parameters())
    feats = {"cls": torch.randn(8, 16) * 10 + 3, "patch": torch.randn(8, 4, 16)}
    assert probe(feats).shape == (8, 2)
    normed = probe.norm(feats["cls"])
    torch.testing.assert_close(normed.mean(0), torch.zeros(16), atol=1e-5, rtol=0)


def test_attentive_probe_pools_all_tokens():
    probe = AttentiveProbe(16, 3, num_heads=4)
    feats = {"cls": torch.randn(2, 16), "patch": torch.randn(2, 7, 16, requires_grad=True)}
    logits, weights = probe(feats, return_weights=True)
    assert logits.shape == (2, 3) and weights.shape == (2, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    logits.sum().backward()
    assert feats["patch"].grad.abs().sum() > 0


def test_patchify_unpatchify_exact_inverses():
    x = torch.randn(2, 3, 16, 24, 8)
    p = patchify(x, 8)
    assert p.shape == (2, 2 * 3 * 1, 8**3 * 3)
    torch.testing.assert_close(p[0, 0], x[0, :, :8, :8, :8].permute(1, 2, 3, 0).reshape(-1))
    torch.testing.assert_close(p[1, 4], x[1, :, 8:16, 8:16, :8].permute(1, 2, 3, 0).reshape(-1))
    assert torch.equal(unpatchify(p, 8, (2, 3, 1), 3), x)


def test_mae_model_predicts_every_patch():
    mae = MaskedAutoencoder3D(create_model("vit3d_tiny"), decoder_dim=48, decoder_depth=1, decoder_heads=4)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :48] = True
    pred = mae(torch.randn(2, 3, 32, 32, 32), mask)
    assert pred.shape == (2, 64, 8**3 * 3)
    pred.sum().backward()
    assert mae.encoder.mask_token.grad is None  # dropped, never replaced
    assert mae.decoder.mask_token.grad.abs().sum() > 0
