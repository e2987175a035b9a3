"""Batched view augmentation (fmct_ray.data.augment) on CPU: windows, flips, shift, smoothing, gamma,
random window, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from fmct_ray.config import ConfigError, load
from fmct_ray.data.augment import (
    AugmentConfig,
    GPUAugment,
    _percentiles,
    adjust_gamma,
    fmct_augment,
    gaussian_smooth,
    hu_windows,
    random_flip,
    random_gamma,
    random_permute,
    random_shift,
    random_smooth,
    random_window,
    voxelfm_augment,
)

OFF = dict(flip_prob=0.0, shift_prob=0.0, smooth_prob=0.0, gamma_prob=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hu_batch(b: int = 4, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(-1024, 3000, (b, s, s, s), generator=gen(seed), dtype=torch.int16)


def test_fmct_windows_map_known_hu_values():
    hu = torch.tensor([-1000, -800, -20, 0, 40, 80, 180, 600, 2000, 3000], dtype=torch.int16)
    out = GPUAugment(fmct_augment(**OFF))(hu.view(1, 1, 1, -1), gen())
    assert out.shape == (1, 3, 1, 1, 10) and out.dtype == torch.float32
    brain, subdural, bone = out[0, :, 0, 0]
    torch.testing.assert_close(brain, torch.tensor([0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1.0]))
    torch.testing.assert_close(subdural, torch.tensor([0, 0, 0, 0.1, 0.3, 0.5, 1, 1, 1, 1.0]))
    torch.testing.assert_close(
        bone, torch.tensor([0, 0, 0.78 / 2.8, 0.8 / 2.8, 0.84 / 2.8, 0.88 / 2.8, 0.98 / 2.8, 0.5, 1, 1])
    )


def test_voxelfm_zscore_clips_and_standardises():
    hu = torch.tensor([-2000, -1000, -573, 0, 1900, 3000], dtype=torch.int16).view(1, 1, 1, -1)
    out = GPUAugment(voxelfm_augment(permute_prob=0.0, random_window_prob=0.0, flip_prob=0.0))(hu, gen())
    assert out.shape == (1, 1, 1, 1, 6)
    clipped = torch.tensor([-1000, -1000, -573, 0, 1900, 1900.0])
    torch.testing.assert_close(out.flatten(), (clipped + 573.8) / 461.3)


def test_flips_with_prob_one_and_zero():
    x = hu_batch()
    torch.testing.assert_close(random_flip(x, 1.0, gen()), x.flip(1, 2, 3))
    torch.testing.assert_close(random_flip(x, 0.0, gen()), x)


def test_flips_are_per_sample_and_per_axis():
    x = hu_batch(b=32, s=6)
    out = random_flip(x, 0.5, gen(1))
    seen = set()
    for i in range(len(x)):
        combos = [d for k in range(4) for d in itertools.combinations((1, 2, 3), k)]
        match = [d for d in combos if torch.equal(out[i], x[i].flip([a - 1 for a in d]) if d else x[i])]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 6  # 32 samples cover most of the 8 flip combinations


def test_permutation_permutes_axes():
    x = hu_batch(b=12, s=5)
    out = random_permute(x, 1.0, gen(2))
    perms = list(itertools.permutations(range(3)))
    kinds = {next(p for p in perms if torch.equal(out[i], x[i].permute(*p))) for i in range(len(x))}
    assert len(kinds) >= 3
    torch.testing.assert_close(random_permute(x, 0.0, gen(2)), x)


def test_shift_adds_one_bounded_offset_per_sample():
    x = torch.rand(64, 2, 3, 3, 3, generator=gen())
    cfg = fmct_augment(shift_prob=1.0)
    delta = random_shift(x, cfg, gen(3)) - x
    per_sample = delta.flatten(1)
    torch.testing.assert_close(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert per_sample.abs().max() <= 0.1 and per_sample[:, 0].std() > 0.03
    torch.testing.assert_close(random_shift(x, fmct_augment(shift_prob=0.0), gen(3)), x)


def test_smoothing_keeps_constants_and_matches_scipy():
    const = torch.full((2, 3, 10, 11, 12), 0.37)
    sigma = torch.tensor([[0.5, 0.7, 1.0], [1.0, 0.6, 0.8]])
    torch.testing.assert_close(gaussian_smooth(const, sigma), const)
    x = torch.randn(2, 1, 20, 18, 16, generator=gen())
    out = gaussian_smooth(x, sigma)
    for i in range(2):
        ref = ndimage.gaussian_filter(
            x[i, 0].double().numpy(), sigma[i].tolist(), mode="nearest", truncate=4.0
        )
        np.testing.assert_allclose(out[i, 0].numpy(), ref, atol=1e-4)
    assert out.var() < 0.5 * x.var()
    assert abs(float(out.mean() - x.mean())) < 0.02


def test_random_smooth_only_touches_chosen_samples():
    x = torch.randn(40, 1, 8, 8, 8, generator=gen())
    out = random_smooth(x, fmct_augment(smooth_prob=0.5), gen(4))
    changed = [not torch.equal(out[i], x[i]) for i in range(len(x))]
    assert 8 < sum(changed) < 32
    assert all(out[i].var() < x[i].var() for i in range(len(x)) if changed[i])


def test_gamma_on_known_values():
    x = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 1, 1, 3)
    torch.testing.assert_close(adjust_gamma(x, torch.tensor([0.5])).flatten(), torch.tensor([0.0, 0.5, 1.0]))
    y = torch.tensor([0.2, 0.45, 1.2]).view(1, 1, 1, 1, 3)  # min 0.2, range 1.0
    torch.testing.assert_close(adjust_gamma(y, torch.tensor([0.5])).flatten(), torch.tensor([0.2, 0.7, 1.2]))


def test_random_gamma_keeps_range_and_order():
    x = torch.rand(16, 3, 4, 4, 4, generator=gen())
    out = random_gamma(x, fmct_augment(gamma_prob=1.0), gen(5))
    flat_x, flat_o = x.flatten(1), out.flatten(1)
    torch.testing.assert_close(flat_o.amin(1), flat_x.amin(1))
    torch.testing.assert_close(flat_o.amax(1), flat_x.amax(1))
    order = flat_x.argsort(dim=1)
    assert (flat_o.gather(1, order).diff(dim=1) >= -1e-6).all()
    assert (flat_o.mean(1) > flat_x.mean(1)).all()  # gamma < 1 brightens


def test_percentiles_match_numpy_within_a_bin():
    x = torch.randint(-1024, 1900, (3, 20, 20, 20), generator=gen()).float()
    qs = torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99])
    got = _percentiles(x, qs, -1000.0, 1900.0, 512)
    for i in range(3):
        vals = x[i].flatten().numpy()
        ref = np.quantile(vals[vals >= -1000], qs.numpy())  # air below -1000 is ignored
        assert np.abs(got[i].numpy() - ref).max() <= 2 * 2900 / 512


def test_random_window_clips_to_a_window_at_most_two_iqr_wide():
    base = torch.randint(-1024, 1900, (8, 12, 12, 12), generator=gen()).float()
    cfg = voxelfm_augment(random_window_prob=1.0)
    out = random_window(base, cfg, gen(6))
    q1, q3 = _percentiles(base, torch.tensor([0.25, 0.75]), -1000.0, 1900.0, 512).unbind(1)
    spread = out.flatten(1).amax(1) - out.flatten(1).amin(1)
    assert (spread <= 2 * (q3 - q1) + 1e-3).all()
    assert (spread < base.flatten(1).amax(1) - base.flatten(1).amin(1)).all()
    inside = (out == base).float().mean()
    assert 0.3 < inside < 1.0  # a window, not a constant
    torch.testing.assert_close(random_window(base, voxelfm_augment(random_window_prob=0.0), gen(6)), base)


def test_pipeline_shapes_for_both_recipes():
    x = hu_batch(b=3, s=12)
    assert GPUAugment(fmct_augment())(x, gen()).shape == (3, 3, 12, 12, 12)
    out = GPUAugment(voxelfm_augment())(x, gen())
    assert out.shape == (3, 1, 12, 12, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_same_seed_same_output_other_seed_other_output():
    x = hu_batch(b=6, s=12)
    for cfg in (fmct_augment(), voxelfm_augment()):
        aug = GPUAugment(cfg)
        torch.testing.assert_close(aug(x, gen(11)), aug(x, gen(11)))
        assert not torch.equal(aug(x, gen(11)), aug(x, gen(12)))


def test_fmct_output_stays_near_unit_range():
    out = GPUAugment(fmct_augment(shift_prob=1.0, smooth_prob=1.0, gamma_prob=1.0))(
        hu_batch(b=8, s=12), gen()
    )
    assert out.min() >= -0.1 - 1e-5 and out.max() <= 1.1 + 1e-5


def test_rejects_device_generators_and_bad_shapes():
    aug = GPUAugment(fmct_augment())
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 1, 4, 4, 4, dtype=torch.int16), gen())
    with pytest.raises(ValueError):
        AugmentConfig(flip_prob=1.5)


def test_config_loads_with_nested_window_tuples():
    cfg = load(AugmentConfig, overrides=["windows=[[40, 80], [600, 2800]]", "gamma_prob=0.3"])
    assert cfg.windows == ((40.0, 80.0), (600.0, 2800.0)) and cfg.channels == 2 and cfg.gamma_prob == 0.3
    with pytest.raises(ConfigError):
        load(AugmentConfig, overrides=["intensity=rgb"])


def test_windows_helper_is_linear_inside_each_window():
    hu = torch.arange(0, 81, dtype=torch.int16).view(1, 1, 1, -1)
    torch.testing.assert_close(hu_windows(hu, ((40.0, 80.0),)).flatten(), torch.arange(0, 81) / 80.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    x = hu_batch(b=4, s=16)
    for cfg in (fmct_augment(shift_prob=1.0, smooth_prob=1.0, gamma_prob=1.0), voxelfm_augment()):
        cpu = GPUAugment(cfg)(x, gen(3))
        gpu = GPUAugment(cfg)(x.cuda(), gen(3))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
