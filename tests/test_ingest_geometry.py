"""Output geometry for any input orientation: markers at known RAS positions must land where they should."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from synthetic import MARKER_RADIUS_MM, MARKERS, grid_affine, head_phantom, sample_world

from fmct_ray.config import ConfigError, load
from fmct_ray.ingest.geometry import PreprocessConfig, convert, reorient_closest_ras
from fmct_ray.ingest.readers import QuarantineError, RawScan

CENTER = np.array([12.0, -20.0, 35.0])  # head centre in world RAS mm, away from the origin on purpose
SPACING = np.array([1.3, 0.9, 2.0])  # anisotropic input voxels
CFG = PreprocessConfig(size=(96, 96, 96))
FIELD_MM = 100.0  # the input grid covers a 100 mm cube around the head


def make_scan(matrix: np.ndarray, field_mm: float = FIELD_MM, **phantom) -> RawScan:
    """The phantom sampled on a grid whose voxel axes are the columns of `matrix`."""
    lengths = np.linalg.norm(matrix, axis=0)
    shape = tuple(int(np.ceil(field_mm / s)) + 1 for s in lengths)
    affine = grid_affine(matrix, shape, CENTER)
    array = sample_world(lambda p: head_phantom(p, center=CENTER, **phantom), affine, shape)
    return RawScan(array, affine, {})


def check_markers(
    volume: np.ndarray, affine: np.ndarray, markers=MARKERS, tol: float = 1.0, hu_tol: float = 0.1
) -> None:
    """Each marker's bright blob is centred within `tol` voxels of its expected voxel, with its own HU."""
    assert volume.dtype == np.int16 and volume.shape == CFG.size
    assert np.allclose(affine[:3, :3], np.eye(3)), "output must be RAS+, 1 mm"
    inv = np.linalg.inv(affine)
    bright = volume > 1100
    found = 0
    for offset, value in markers:
        expected = (inv @ np.r_[CENTER + offset, 1.0])[:3]
        lo = np.maximum(np.round(expected).astype(int) - 7, 0)
        window = tuple(slice(a, a + 15) for a in lo)
        mask = bright[window]
        assert mask.sum() > 0.5 * 4 / 3 * np.pi * MARKER_RADIUS_MM**3, (
            f"marker {value} HU not found at {expected}"
        )
        centroid = np.argwhere(mask).mean(axis=0) + lo
        assert np.linalg.norm(centroid - expected) < tol, (
            f"marker {value} HU at {centroid}, expected {expected}"
        )
        at_center = volume[tuple(np.round(expected).astype(int))]
        assert abs(at_center - value) < hu_tol * value, (
            f"{at_center} HU at {expected}, expected marker {value}"
        )
        found += mask.sum()
    assert bright.sum() == found, "bright voxels outside the expected marker positions (mirrored axis?)"


def permuted_flipped(perm: tuple[int, ...], flips: tuple[int, ...]) -> np.ndarray:
    """3x3 voxel->world matrix: voxel axis i runs along world axis perm[i], sign flips[i]."""
    matrix = np.zeros((3, 3))
    for i, (axis, sign) in enumerate(zip(perm, flips, strict=True)):
        matrix[axis, i] = sign * SPACING[i]
    return matrix


AXIS_CASES = list(itertools.product(itertools.permutations(range(3)), itertools.product((1, -1), repeat=3)))


@pytest.mark.parametrize(("perm", "flips"), AXIS_CASES, ids=[f"{p}-{f}" for p, f in AXIS_CASES])
def test_every_permutation_and_flip_lands_markers(perm, flips):
    scan = make_scan(permuted_flipped(perm, flips))
    volume, affine = convert(scan, CFG)
    check_markers(volume, affine)


@pytest.mark.parametrize(
    ("codes", "perm", "flips"),
    [
        ("LPS", (0, 1, 2), (-1, -1, 1)),  # DICOM
        ("LAS", (0, 1, 2), (-1, 1, 1)),  # FSL radiological
        ("LPI", (0, 1, 2), (-1, -1, -1)),
        ("PIR", (1, 2, 0), (-1, -1, 1)),
    ],
)
def test_named_orientations(codes, perm, flips):
    scan = make_scan(permuted_flipped(perm, flips))
    assert "".join(nib.aff2axcodes(scan.affine)) == codes
    array, affine = reorient_closest_ras(scan.array, scan.affine)
    assert "".join(nib.aff2axcodes(affine)) == "RAS"
    assert np.allclose(affine[:3, :3], np.diag(SPACING[list(np.argsort(perm))]))
    check_markers(*convert(scan, CFG))


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.mark.parametrize(
    ("axis", "degrees", "flips"),
    [
        ((1, 0, 0), 17.0, (1, 1, 1)),  # tilted axial
        ((0.3, 1, 0.2), 28.0, (-1, -1, 1)),  # double-oblique LPS-like
        ((1, 1, 1), 60.0, (1, -1, -1)),  # far from any axis
    ],
)
def test_oblique_affines(axis, degrees, flips):
    scan = make_scan(rotation(axis, degrees) @ np.diag(SPACING * np.asarray(flips)))
    check_markers(*convert(scan, CFG))


def test_sheared_affine_gantry_tilt():
    matrix = np.diag(SPACING)
    matrix[1, 2] = 0.5  # slice origins shift along A by 0.5 mm per slice (gantry tilt)
    check_markers(*convert(make_scan(matrix), CFG))


def test_cubic_and_nearest_interpolation_land_markers():
    scan = make_scan(permuted_flipped((2, 0, 1), (-1, 1, -1)))
    for interpolation, hu_tol in (("cubic", 0.25), ("nearest", 0.01)):  # cubic splines overshoot at edges
        check_markers(
            *convert(scan, PreprocessConfig(size=CFG.size, interpolation=interpolation)), hu_tol=hu_tol
        )


def test_box_keeps_head_and_ignores_table():
    """A thin table slab behind the head is ignored; the head is centred in the box."""
    scan = make_scan(np.diag(SPACING))
    world = scan.affine[:3, :3] @ np.indices(scan.array.shape).reshape(3, -1) + scan.affine[:3, 3:4]
    table = (np.abs(world[1] - (CENTER[1] - 46)) < 1.5).reshape(scan.array.shape)  # 3 mm slab, 8 mm behind
    scan.array[table] = 200.0
    volume, affine = convert(scan, CFG)
    head_center = (np.linalg.inv(affine) @ np.r_[CENTER, 1])[:3]
    assert np.all(np.abs(head_center - (np.asarray(CFG.size) - 1) / 2) <= 1.0), head_center


def test_tall_head_keeps_the_top():
    """A head taller than the box along S keeps its vertex (plus margin) and loses the neck."""
    radii = (30.0, 38.0, 70.0)  # 140 mm tall, box 96
    scan = make_scan(np.diag(SPACING * [1, 1, 0.5]), field_mm=160.0, radii=radii)
    volume, affine = convert(scan, CFG)
    top_world = CENTER[2] + radii[2]
    top_voxel = (np.linalg.inv(affine) @ np.r_[CENTER[:2], top_world, 1])[2]
    assert CFG.size[2] - 1 - top_voxel == pytest.approx(CFG.top_margin_mm, abs=1.5)
    column = volume[48, 48, :]
    assert column[-1] == -1024 and (column[: int(top_voxel) - 2] > -500).all()


def test_air_to_constant_and_clip():
    scan = make_scan(np.diag(SPACING))
    scan.array[:] += np.random.default_rng(0).normal(0, 30, scan.array.shape).astype(np.float32)
    scan.array[scan.array > 2000] = 5000.0
    volume, _ = convert(scan, CFG)
    assert volume.max() == 3071
    assert not np.any((volume > -1024) & (volume < -900)), "air below -900 HU must be set to -1024"
    noisy, _ = convert(scan, PreprocessConfig(size=CFG.size, air_to_constant=False))
    assert np.any((noisy > -1024) & (noisy < -900))


def test_empty_scan_is_quarantined():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(QuarantineError, match="no head"):
        convert(RawScan(np.full((20, 20, 20), -1000.0, np.float32), affine, {}), CFG)


def test_preprocess_config_loads_from_overrides():
    cfg = load(
        PreprocessConfig, overrides=["interpolation=cubic", "size=[128,128,160]", "air_to_constant=false"]
    )
    assert (cfg.order, cfg.size, cfg.air_to_constant) == (3, (128, 128, 160), False)
    with pytest.raises(ConfigError, match="interpolation"):
        load(PreprocessConfig, overrides=["interpolation=quintic"])
    with pytest.raises(ConfigError, match="clip_range"):
        load(PreprocessConfig, overrides=["clip_range=[100,-100]"])


def test_reorientation_is_exact_for_axis_aligned_inputs():
    rng = np.random.default_rng(1)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = permuted_flipped((1, 2, 0), (-1, 1, -1))
    out, out_affine = reorient_closest_ras(array, affine)
    idx = np.array([[1, 2, 3], [4, 0, 6], [0, 5, 0]])
    for i in idx:  # the same world point holds the same value, bit for bit
        world = affine @ np.r_[i, 1]
        j = np.rint(np.linalg.inv(out_affine) @ world)[:3].astype(int)
        assert out[tuple(j)] == array[tuple(i)]
    assert ndi.sum(out) == pytest.approx(ndi.sum(array))


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_masks_and_points_land_on_their_structure_in_the_stored_volume(orientation):
    """A synthetic head and its label volume (ventricles 1, a lesion 2) written in an orientation
    (axis-aligned LPS, or RAS turned 20 degrees about two axes), converted as the ingest does: the
    stored labels sit on the stored volume's CSF and lesion, keep their volume, and the lesion
    centre given in the scan's world frame lands in the stored lesion."""
    from fmct_ray.ingest.geometry import convert_mask, to_stored_frame
    from fmct_ray.synthetic import Anatomy, Findings, Lesion, Scan, orientation_affine, render_head

    shape, cfg = (150, 180, 150), PreprocessConfig(size=(160, 192, 160))
    anatomy = Anatomy(radii=(60.0, 78.0, 62.0), yaw_deg=7.0, shift=(3.0, -2.0, 4.0), noise_hu=0, texture_hu=0)
    findings = Findings(hydrocephalus=1.6, lesions=(Lesion((-28.0, 15.0, 12.0), 8.0, 72.0),))
    hu, labels = render_head(np.random.default_rng(0), shape, anatomy=anatomy, findings=findings)
    transform, affine = orientation_affine("LPS" if orientation == "LPS" else "RAS", shape, (1.0, 1.0, 1.0))
    hu, labels = transform(hu), transform(labels)
    world = affine  # grid mm of the RAS array -> world
    if orientation == "oblique":
        turn = np.eye(4)
        turn[:3, :3] = nib.eulerangles.euler2mat(z=np.radians(20)) @ nib.eulerangles.euler2mat(
            x=np.radians(20)
        )
        affine = world = turn @ affine
    volume, stored_affine = convert(RawScan(hu, affine, {}), cfg)
    stored = convert_mask(labels, affine, stored_affine, cfg.size)
    assert stored.shape == cfg.size and stored.dtype == np.uint8
    assert abs(np.median(volume[stored == 1]) - 6) <= 2  # CSF
    assert abs(np.median(volume[stored == 2]) - 72) <= 2  # the lesion
    assert (stored == 1).sum() == pytest.approx((labels == 1).sum(), rel=0.03)
    centre = Scan(np.zeros(shape), anatomy, findings).record()  # grid mm of the RAS array
    point = np.array([centre[f"lesion_{a}_mm"] for a in "xyz"])
    if orientation == "LPS":  # the world frame is the RAS array's: its affine, not the LPS file's
        world = orientation_affine("RAS", shape, (1.0, 1.0, 1.0))[1]
    in_world = (world @ np.r_[point, 1.0])[:3]
    in_store = to_stored_frame(in_world, stored_affine)[0]
    assert stored[tuple(np.round(in_store).astype(int))] == 2
