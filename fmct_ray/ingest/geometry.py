"""HU volume on any voxel grid -> int16 HU, RAS+, 1 mm isotropic, 224^3 around the head (SPEC section 1).

Steps of `convert`:
1. Reorient to the closest RAS axes by permutation and flips only (nibabel `io_orientation`): exact,
   no interpolation. Axis-aligned inputs (any of the 48 permutation/flip combinations, LPS, LAS, LPI,
   anisotropic spacing) end with a positive diagonal affine; oblique ones keep a residual rotation.
2. Find the head: voxels above `foreground_hu` (-500 HU) on a coarse (~2 mm) grid, a one-voxel binary
   opening to detach thin table and head-holder parts, and the largest connected component. Its world
   bounding box decides the output box: centred on each axis where it fits; along S, when the head is
   taller than the box, the box keeps the top of the head (plus `top_margin_mm`) and drops the neck.
3. One interpolation, output grid -> input voxel coordinates (`scipy.ndimage.affine_transform`),
   evaluated only on the output box (cropped-away voxels are never resampled) from only the part of
   the input that box touches; the separable diagonal fast path serves axis-aligned inputs, the full
   matrix serves oblique ones. Outside the input: `pad_value` (-1024, air). Interpolation order:
   linear (default, the VoxelFM choice) or cubic (the FM-CT paper's choice); nearest for tests.
4. Air to a constant (on by default): voxels below `air_threshold_hu` (-900 HU) become -1024. Every
   FM-CT window maps < -800 HU to 0 and VoxelFM's clip starts at -1000, so models cannot see the
   difference, while noisy air roughly halves Zarr compression (RAY_ZARR_NOTES).
5. Clip to [-1024, 3071] and round to int16.

The returned affine maps output voxel indices to RAS+ world mm: diag(spacing) plus the box origin.
Label volumes aligned with a scan go through the same geometry (`convert_mask`: nearest
neighbour), and points in the scan's world frame map to the stored frame (`to_stored_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from fmct_ray.ingest.readers import QuarantineError, RawScan

_ORDERS = {"nearest": 0, "linear": 1, "cubic": 3}


@dataclass(frozen=True)
class PreprocessConfig:
    """Geometry and intensity of stored volumes.

    Args:
        spacing: output voxel size, mm (isotropic).
        size: output shape (R, A, S), voxels.
        interpolation: "linear" (default), "cubic" (FM-CT paper) or "nearest".
        clip_range: HU range kept; int16 storage.
        pad_value: HU written where the box extends beyond the scan (air).
        foreground_hu: voxels above this are head (or table) when locating the head.
        head_grid_mm: resolution of the grid on which the head is located.
        top_margin_mm: air kept above the skull vertex when the head is taller than the box.
        air_to_constant: set voxels below `air_threshold_hu` to the low clip value (see module doc).
        air_threshold_hu: HU below which a voxel is air.
    """

    spacing: float = 1.0
    size: tuple[int, int, int] = (224, 224, 224)
    interpolation: Literal["nearest", "linear", "cubic"] = "linear"
    clip_range: tuple[int, int] = (-1024, 3071)
    pad_value: int = -1024
    foreground_hu: float = -500.0
    head_grid_mm: float = 2.0
    top_margin_mm: float = 4.0
    air_to_constant: bool = True
    air_threshold_hu: float = -900.0

    def __post_init__(self) -> None:
        if self.spacing <= 0 or self.head_grid_mm <= 0:
            raise ValueError("spacing and head_grid_mm must be positive")
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size must be three positive ints, got {self.size}")
        lo, hi = self.clip_range
        if not -32768 <= lo < hi <= 32767:
            raise ValueError(f"clip_range {self.clip_range} must be increasing and fit int16")
        if self.interpolation not in _ORDERS:
            raise ValueError(f"interpolation {self.interpolation!r} not in {sorted(_ORDERS)}")

    @property
    def order(self) -> int:
        return _ORDERS[self.interpolation]


def reorient_closest_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip voxel axes so they point (as closely as possible) to +R, +A, +S; exact."""
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    out = nib.orientations.apply_orientation(array, ornt)
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)


def _largest_component(mask: np.ndarray, threshold: float) -> np.ndarray:
    opened = ndi.binary_opening(mask)
    if opened.any():  # tiny inputs can vanish under the opening; fall back to the raw mask
        mask = opened
    labels, count = ndi.label(mask)
    if count == 0:
        raise QuarantineError(f"no voxel above {threshold:g} HU: no head found")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    found = [
        np.nonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i)))[0] for i in range(mask.ndim)
    ]
    return np.array([f[0] for f in found]), np.array([f[-1] for f in found])


def _head_voxel_box(
    array: np.ndarray, strides: tuple[int, ...], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index bounds (inclusive) of the head: the largest foreground component found on a strided
    grid, then refined at full resolution within that component (dilated by one coarse voxel)."""
    coarse = _largest_component(array[tuple(slice(None, None, s) for s in strides)] > threshold, threshold)
    clo, chi = _bounds(coarse)
    clo, chi = np.maximum(clo - 1, 0), chi + 2
    near = ndi.binary_dilation(coarse[tuple(slice(a, b) for a, b in zip(clo, chi, strict=True))])
    lo = clo * np.asarray(strides)
    hi = np.minimum(chi * np.asarray(strides), array.shape)
    for axis, s in enumerate(strides):
        near = np.repeat(near, s, axis=axis)
    fine = array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] > threshold
    fine &= near[tuple(slice(0, n) for n in fine.shape)]
    flo, fhi = _bounds(fine)
    return lo + flo, lo + fhi


def head_box_origin(array: np.ndarray, affine: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """World (RAS mm) position of output voxel (0, 0, 0) so that the box holds the head."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    strides = tuple(int(max(1, round(cfg.head_grid_mm / s))) for s in spacing)
    lo, hi = _head_voxel_box(array, strides, cfg.foreground_hu)
    corners = np.array(
        [
            [a, b, c]
            for a in (lo[0] - 0.5, hi[0] + 0.5)
            for b in (lo[1] - 0.5, hi[1] + 0.5)
            for c in (lo[2] - 0.5, hi[2] + 0.5)
        ]
    )
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    wmin, wmax = world.min(axis=0), world.max(axis=0)
    size = np.asarray(cfg.size, dtype=np.float64)
    start = (wmin + wmax) / 2 - (size - 1) / 2 * cfg.spacing  # centred
    if wmax[2] - wmin[2] > size[2] * cfg.spacing:  # taller than the box: keep the top of the head
        start[2] = wmax[2] + cfg.top_margin_mm - (size[2] - 0.5) * cfg.spacing
    return np.round(start / cfg.spacing) * cfg.spacing


def output_affine(origin: np.ndarray, spacing: float) -> np.ndarray:
    out = np.diag([spacing, spacing, spacing, 1.0])
    out[:3, 3] = origin
    return out


def resample(
    array: np.ndarray,
    affine: np.ndarray,
    out_affine: np.ndarray,
    shape: tuple[int, int, int],
    order: int = 1,
    cval: float = -1024.0,
) -> np.ndarray:
    """Sample `array` (voxel grid `affine`) on the grid `out_affine` x `shape`; float32.

    Only the part of the input that the output grid touches (plus a margin for the spline) is read.
    """
    vox = np.linalg.inv(affine) @ out_affine  # output voxel -> input voxel
    corners = (
        np.array(
            [[a, b, c, 1.0] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
        )
        @ vox.T
    )
    margin = 2 if order <= 1 else 8  # the cubic prefilter is global; its influence decays ~0.27/voxel
    lo = np.clip(np.floor(corners[:, :3].min(axis=0)).astype(int) - margin, 0, array.shape)
    hi = np.clip(np.ceil(corners[:, :3].max(axis=0)).astype(int) + margin + 1, 0, array.shape)
    if np.any(hi - lo < 1):
        return np.full(shape, cval, dtype=np.float32)
    sub = np.array(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32, order="K")
    # Work in memory order (e.g. DICOM volumes are [slice, row, col] in memory): 2x faster than strided.
    perm = np.argsort(sub.strides, kind="stable")[::-1]
    matrix, offset = vox[:3, :3][np.ix_(perm, perm)], (vox[:3, 3] - lo)[perm]
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-9):
        matrix = np.diag(matrix)  # separable fast path in scipy
    sub = sub.transpose(perm)
    if order > 1:  # spline coefficients in float32 (scipy's own prefilter works in float64: 2x the memory)
        sub = ndi.spline_filter(sub, order=order, output=np.float32, mode="constant")
    out = ndi.affine_transform(
        sub,
        matrix,
        offset,
        output_shape=tuple(np.asarray(shape)[perm]),
        order=order,
        mode="constant",
        cval=cval,
        output=np.float32,
        prefilter=False,
    )
    return out.transpose(np.argsort(perm))  # a view; `convert` makes the int16 result contiguous


def to_int16(volume: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Air to a constant (optional), clip to `clip_range`, round to int16 (in place on `volume`)."""
    lo, hi = cfg.clip_range
    if cfg.air_to_constant:
        volume[volume < cfg.air_threshold_hu] = lo
    np.clip(volume, lo, hi, out=volume)
    return np.rint(volume).astype(np.int16)


def convert(raw: RawScan, cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HU scan -> (int16 HU volume of `cfg.size`, RAS+ at `cfg.spacing` mm; its 4x4 voxel->world affine)."""
    cfg = cfg or PreprocessConfig()
    array, affine = reorient_closest_ras(raw.array, np.asarray(raw.affine, dtype=np.float64))
    out_affine = output_affine(head_box_origin(array, affine, cfg), cfg.spacing)
    volume = resample(array, affine, out_affine, cfg.size, cfg.order, cval=cfg.pad_value)
    return np.ascontiguousarray(to_int16(volume, cfg)), out_affine


def convert_mask(
    mask: np.ndarray, affine: np.ndarray, stored_affine: np.ndarray, size: tuple[int, int, int]
) -> np.ndarray:
    """A label volume on its scan's voxel grid (`affine`: the scan's) -> uint8 labels on the stored
    grid of that scan (`stored_affine` x `size`, what `convert` returned): the same reorientation
    and box, nearest neighbour, 0 outside the input."""
    array, affine = reorient_closest_ras(np.asarray(mask), np.asarray(affine, dtype=np.float64))
    return np.rint(resample(array, affine, stored_affine, size, order=0, cval=0)).astype(np.uint8)


def to_stored_frame(points: np.ndarray, stored_affine: np.ndarray) -> np.ndarray:
    """World RAS mm points (n, 3) of a scan -> its stored frame: voxel index x spacing (mm)."""
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    index = (np.linalg.inv(stored_affine) @ np.c_[points, np.ones(len(points))].T)[:3].T
    return index * np.linalg.norm(stored_affine[:3, :3], axis=0)
