"""Multi-crop views on the CPU (fmct_ray.data.crops): shapes, placement, determinism, resizing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmct_ray.config import ConfigError, load
from fmct_ray.data.crops import (
    CROP_PRESETS,
    MultiCrop,
    MultiCropConfig,
    eval_view,
    find_foreground,
    fmct_multicrop,
    foreground_fraction,
    mae_multicrop,
    resize_box,
    voxelfm_multicrop,
)

N = 224


def synthetic_head(radii=(80, 95, 75)) -> np.ndarray:
    """An ellipsoid head (skull 1000 HU, brain 35 HU) centred in 224^3 of air/padding at -1024."""
    z, y, x = np.ogrid[:N, :N, :N]
    c = N // 2
    r = ((z - c) / radii[0]) ** 2 + ((y - c) / radii[1]) ** 2 + ((x - c) / radii[2]) ** 2
    vol = np.full((N, N, N), -1024, np.int16)
    vol[r <= 1] = 1000
    vol[r <= 0.85] = 35
    return vol


@pytest.fixture(scope="module")
def head() -> np.ndarray:
    return synthetic_head()


def box_fractions(vol: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    return np.array([foreground_fraction(vol[a[0] : b[0], a[1] : b[1], a[2] : b[2]]) for a, b in boxes])


@pytest.mark.parametrize("name", sorted(CROP_PRESETS))
def test_views_have_preset_shapes_and_int16(head, name):
    cfg = CROP_PRESETS[name]()
    out = MultiCrop(cfg)(head, np.random.default_rng(0))
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (cfg.n_global,) + (cfg.global_size,) * 3
    assert out["local"].shape == (cfg.n_local,) + (cfg.local_size,) * 3
    assert out["global"].dtype == out["local"].dtype == np.int16


def test_presets_follow_the_recipes():
    fm, vx, mae = fmct_multicrop(), voxelfm_multicrop(), mae_multicrop()
    assert (fm.n_global, fm.global_box, fm.n_local, fm.local_box, fm.global_size, fm.local_size) == (
        2,
        (112, 224),
        3,
        (64, 112),
        96,
        96,
    )
    assert (vx.n_global, vx.global_size, vx.n_local, vx.local_size, vx.box_shape) == (2, 112, 8, 56, "cube")
    assert (mae.n_global, mae.n_local, mae.global_size) == (1, 0, 96)


def test_same_seed_same_views_other_seed_other_views(head):
    mc = MultiCrop(fmct_multicrop())
    a = mc(head, np.random.default_rng(7))
    b = mc(head, np.random.default_rng(7))
    c = mc(head, np.random.default_rng(8))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["global"], c["global"])


def test_views_are_the_sampled_boxes_resized(head):
    mc = MultiCrop(fmct_multicrop())
    boxes = mc.sample_boxes(head, np.random.default_rng(3))
    out = mc(head, np.random.default_rng(3))
    views = np.concatenate([out["global"], out["local"]])
    for (lo, hi), view in zip(boxes, views, strict=True):
        box = torch.from_numpy(head[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32))
        ref = F.interpolate(box[None, None], size=view.shape, mode="trilinear", align_corners=False)[0, 0]
        assert np.abs(view.astype(np.float32) - ref.numpy()).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("placement", ["foreground", "uniform"])
def test_boxes_lie_in_the_volume_with_sizes_in_range(head, placement):
    cfg = fmct_multicrop(placement=placement)
    mc, rng = MultiCrop(cfg), np.random.default_rng(0)
    fg = find_foreground(head)
    for _ in range(50):
        boxes = mc.sample_boxes(head, rng)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] <= N).all()
        size = boxes[:, 1] - boxes[:, 0]
        for s, (lo, hi) in zip(size, [cfg.global_box] * 2 + [cfg.local_box] * 3, strict=True):
            assert (s >= lo).all() and (s <= hi).all()
            if placement == "foreground":  # capped at the head's extent (but never below the minimum)
                assert (s <= np.maximum(lo, fg.hi - fg.lo)).all()


def test_foreground_placement_keeps_global_views_on_the_head(head):
    fractions = {}
    for placement in ("foreground", "uniform"):
        mc, rng = MultiCrop(fmct_multicrop(placement=placement)), np.random.default_rng(0)
        boxes = np.concatenate([mc.sample_boxes(head, rng)[:2] for _ in range(40)])
        fractions[placement] = box_fractions(head, boxes)
    fg, uni = fractions["foreground"], fractions["uniform"]
    assert fg.mean() > 0.6 and fg.min() > 0.5  # mostly head, never mostly air
    assert uni.mean() < 0.5
    assert fg.mean() - uni.mean() > 0.2


def test_foreground_placement_keeps_local_views_on_the_head(head):
    mc, rng = MultiCrop(fmct_multicrop()), np.random.default_rng(1)
    boxes = np.concatenate([mc.sample_boxes(head, rng)[2:] for _ in range(40)])
    assert box_fractions(head, boxes).min() > 0.5


def test_uniform_placement_reproduces_fmct_padding_share():
    """FM-CT padded its cached 96^3 volume to 224^3 and cropped 112-224 boxes anywhere: about 81% of
    a global crop was padding. Uniform placement on that layout gives the same share."""
    lo, hi = (N - 96) // 2, (N - 96) // 2 + 96
    vol = np.full((N, N, N), -1024, np.int16)
    vol[lo:hi, lo:hi, lo:hi] = 40
    mc, rng = MultiCrop(fmct_multicrop(placement="uniform")), np.random.default_rng(0)
    boxes = np.concatenate([mc.sample_boxes(vol, rng)[:2] for _ in range(300)])
    overlap = np.clip(np.minimum(boxes[:, 1], hi) - np.maximum(boxes[:, 0], lo), 0, None)
    padding = 1 - overlap.prod(axis=1) / (boxes[:, 1] - boxes[:, 0]).prod(axis=1)
    assert 0.78 < padding.mean() < 0.84
    fg_boxes = np.concatenate([MultiCrop(fmct_multicrop()).sample_boxes(vol, rng)[:2] for _ in range(50)])
    assert box_fractions(vol, fg_boxes).mean() > 0.6  # 96^3 head in a >= 112^3 box: at least 63%


def test_cube_boxes_are_cubes(head):
    boxes = MultiCrop(voxelfm_multicrop()).sample_boxes(head, np.random.default_rng(0))
    size = boxes[:, 1] - boxes[:, 0]
    assert (size == size[:, :1]).all()


def test_all_air_volume_falls_back_to_uniform():
    vol = np.full((128, 128, 128), -1024, np.int16)
    out = MultiCrop(fmct_multicrop(global_box=(64, 128), local_box=(32, 64)))(vol, np.random.default_rng(0))
    assert out["global"].shape == (2, 96, 96, 96) and (out["global"] == -1024).all()


def test_find_foreground_bounds_the_head(head):
    fg = find_foreground(head)
    c = N // 2
    expected_lo = np.array([c - 80, c - 95, c - 75])
    expected_hi = np.array([c + 81, c + 96, c + 76])
    assert (np.abs(fg.lo - expected_lo) <= 4).all() and (np.abs(fg.hi - expected_hi) <= 4).all()
    assert (fg.lo <= expected_lo).all() and (fg.hi >= expected_hi).all()  # never cuts the head


def test_foreground_fraction_counts_voxels_above_threshold():
    vol = np.full((4, 4, 4), -1024, np.int16)
    vol[:2] = 0
    vol[0, 0, 0] = -600
    assert foreground_fraction(vol) == pytest.approx(31 / 64)
    assert foreground_fraction(vol, threshold_hu=-700) == pytest.approx(32 / 64)


def test_resize_box_matches_trilinear_and_keeps_ramps():
    rng = np.random.default_rng(0)
    box = rng.integers(-1024, 3071, (50, 70, 40)).astype(np.int16)
    ref = F.interpolate(torch.from_numpy(box).float()[None, None], size=(32,) * 3, mode="trilinear")[0, 0]
    out = resize_box(box, 32, scratch=torch.empty(10**6))
    assert out.dtype == np.int16 and out.shape == (32, 32, 32)
    assert np.abs(out - ref.numpy()).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(resize_box(box[:32, :32, :32], 32), box[:32, :32, :32])
    ramp = np.broadcast_to(np.arange(0, 1000, 10, dtype=np.int16)[:, None, None], (100, 8, 8))
    up = resize_box(np.ascontiguousarray(ramp), 50)[:, 0, 0]
    np.testing.assert_allclose(up[1:-1], 20 * np.arange(1, 49) + 5, atol=1)  # halving a 10-step ramp


def test_eval_view_is_the_resized_centre_crop():
    z = np.arange(N, dtype=np.int16)[:, None, None]
    vol = np.ascontiguousarray(np.broadcast_to(z, (N, N, N)))
    view = eval_view(vol)
    assert view.shape == (96, 96, 96) and view.dtype == np.int16
    profile = view[:, 48, 48].astype(float)
    # centre 192 slices are 16..207; each output voxel averages 2 of them
    np.testing.assert_allclose(profile, 16 + 2 * np.arange(96) + 0.5, atol=0.51)
    with pytest.raises(ValueError):
        eval_view(np.zeros((100, 100, 100), np.int16))


def test_config_loads_from_overrides_and_rejects_bad_values():
    cfg = load(MultiCropConfig, overrides=["placement=uniform", "global_box=[100, 200]", "n_local=8"])
    assert cfg.placement == "uniform" and cfg.global_box == (100, 200) and cfg.n_local == 8
    with pytest.raises(ConfigError):
        load(MultiCropConfig, overrides=["placement=anywhere"])
    with pytest.raises(ConfigError):
        load(MultiCropConfig, overrides=["local_box=[112, 64]"])


def test_multicrop_pickles_without_its_scratch_buffer(head):
    mc = MultiCrop(fmct_multicrop())
    mc(head, np.random.default_rng(0))
    clone = pickle.loads(pickle.dumps(mc))
    assert clone._scratch is None and clone.cfg == mc.cfg
    np.testing.assert_array_equal(
        clone(head, np.random.default_rng(5))["local"], mc(head, np.random.default_rng(5))["local"]
    )
