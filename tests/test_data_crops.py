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
    assert fm.resize == mae.resize == MultiCropConfig().resize == "area"  # MONAI Resize's default
    assert vx.resize == "trilinear"


def test_same_seed_same_views_other_seed_other_views(head):
    mc = MultiCrop(fmct_multicrop())
    a = mc(head, np.random.default_rng(7))
    b = mc(head, np.random.default_rng(7))
    c = mc(head, np.random.default_rng(8))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["global"], c["global"])


def area_reference(box: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling along shrinking axes (F.interpolate(mode="area"), MONAI Resize),
    then trilinear along growing ones (identity along the others)."""
    x = torch.from_numpy(box.astype(np.float32))[None, None]
    x = F.adaptive_avg_pool3d(x, [min(n, size) for n in box.shape])
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()


def trilinear_reference(box: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(box.astype(np.float32))[None, None]
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize(
    "preset, reference, tol",
    [
        # F.interpolate computes its linear weights in float32: a few hundredths of an HU apart
        (fmct_multicrop, area_reference, 0.6),
        (voxelfm_multicrop, trilinear_reference, 0.5 + 1e-3),
    ],
)
def test_views_are_the_sampled_boxes_resized(head, preset, reference, tol):
    mc = MultiCrop(preset())
    boxes = mc.sample_boxes(head, np.random.default_rng(3))
    out = mc(head, np.random.default_rng(3))
    views = [*out["global"], *out["local"]]
    for (lo, hi), view in zip(boxes, views, strict=True):
        ref = reference(head[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], view.shape[0])
        assert np.abs(view.astype(np.float32) - ref).max() <= tol


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


def test_resize_box_matches_trilinear_and_area_and_keeps_ramps():
    rng = np.random.default_rng(0)
    box = rng.integers(-1024, 3071, (50, 70, 40)).astype(np.int16)
    x = torch.from_numpy(box).float()[None, None]
    for mode in ("trilinear", "area"):
        ref = F.interpolate(x, size=(32,) * 3, mode=mode)[0, 0]
        out = resize_box(box, 32, scratch=torch.empty(10**6), mode=mode)
        assert out.dtype == np.int16 and out.shape == (32, 32, 32)
        assert np.abs(out - ref.numpy()).max() <= 0.5 + 1e-3
        np.testing.assert_array_equal(resize_box(box[:32, :32, :32], 32, mode=mode), box[:32, :32, :32])
        ramp = np.broadcast_to(np.arange(0, 1000, 10, dtype=np.int16)[:, None, None], (100, 8, 8))
        down = resize_box(np.ascontiguousarray(ramp), 50, mode=mode)[:, 0, 0]
        np.testing.assert_allclose(down[1:-1], 20 * np.arange(1, 49) + 5, atol=1)  # halving a 10-step ramp
    with pytest.raises(ValueError):
        resize_box(box, 32, mode="cubic")


def test_area_resize_is_anti_aliased():
    """White noise of std 100 from 224^3 to 96^3: area averages 3^3-voxel bins (100 / sqrt(27) =
    19.2); trilinear samples 8 neighbours and keeps 3x the noise."""
    noise = np.random.default_rng(0).normal(0, 100, (N, N, N)).round().astype(np.int16)
    scratch = torch.empty(noise.size)
    area = resize_box(noise, 96, scratch, mode="area").std()
    trilinear = resize_box(noise, 96, scratch, mode="trilinear").std()
    assert 18.0 < area < 20.5, area
    assert 56.0 < trilinear < 62.0, trilinear
    assert eval_view(noise).std() == pytest.approx(100 / np.sqrt(8), rel=0.05)  # 2x2x2 means


def test_area_resize_upsamples_linearly_and_keeps_constants_and_the_int16_range():
    rng = np.random.default_rng(1)
    small = rng.integers(-1024, 3071, (40, 60, 30)).astype(np.int16)  # every axis grows to 96
    up = resize_box(small, 96, mode="area").astype(int) - resize_box(small, 96, mode="trilinear")
    assert np.abs(up).max() <= 1  # the same interpolation, rounded apart at .5 ties
    mixed = (150, 64, 96)  # shrinks, grows, stays
    for value in (-32768, -1024, 0, 37, 32767):
        for mode in ("area", "trilinear"):
            out = resize_box(np.full(mixed, value, np.int16), 96, mode=mode)
            assert out.shape == (96, 96, 96) and (out == value).all()
    extremes = rng.choice(np.array([-32768, 32767], np.int16), mixed)
    for mode, reference in (("area", area_reference), ("trilinear", trilinear_reference)):
        out = resize_box(extremes, 96, mode=mode)
        assert out.dtype == np.int16
        assert np.abs(out - reference(extremes, 96)).max() <= 1  # no wrap-around at the extremes
    ramp = np.repeat(np.repeat(20 * np.arange(48, dtype=np.int16)[:, None, None], 4, 1), 4, 2)
    up = resize_box(ramp, 96, mode="area")[:, 0, 0].astype(float)
    np.testing.assert_allclose(up[1:-1], 10 * np.arange(1, 95) - 5, atol=0.51)  # linear, not blocky


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
    cfg = load(
        MultiCropConfig,
        overrides=["placement=uniform", "global_box=[100, 200]", "n_local=8", "resize=trilinear"],
    )
    assert cfg.placement == "uniform" and cfg.global_box == (100, 200) and cfg.n_local == 8
    assert cfg.resize == "trilinear"
    with pytest.raises(ConfigError):
        load(MultiCropConfig, overrides=["resize=cubic"])
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
