"""Multi-crop views on the CPU: random boxes of an int16 HU volume, resized to the model's input size.

This is the CPU half of the pretraining data path (issue 4, "split the work where it is cheapest"):
a worker that has read one 224^3 int16 volume cuts every view of that scan from it (several crops
per volume read) and ships int16 crops. Windowing, flips and intensity augmentation run later as
batched tensor ops on the training device (`fmct_ray.data.augment`).

Variable-size boxes cannot be batched, so each box is resized here, one at a time, on a float32
copy of just that box held in a reused scratch buffer (a fresh 45 MB allocation page-faults every
time: reusing it cut the copy of a 224^3 box from 18 ms to 4 ms). Two resize modes
(`MultiCropConfig.resize`):

- `"area"` (default, the FM-CT recipes): MONAI's `Resize` default. Along an axis that shrinks,
  each output voxel is the mean of its input bin [floor(i n/m), ceil((i+1) n/m)) (adaptive average
  pooling, what `F.interpolate(mode="area")` computes), so downsampling is anti-aliased: white
  noise of std 100 resized from 224^3 to 96^3 keeps std 19, against 59 with trilinear. Along an
  axis that grows (small local boxes), area is not anti-aliasing: adaptive pooling then copies or
  averages pairs of neighbours, a blocky near-nearest upsampling. There we interpolate linearly,
  as trilinear does; this is the one place where we differ from MONAI on purpose.
- `"trilinear"` (VoxelFM): `F.interpolate(mode="trilinear", align_corners=False)`, which aliases
  when it shrinks a box by more than 2x.

The area mode is separable: one banded matrix product per axis (`_axis_weights`), shrinking axes
first. On one core it resizes a 224^3 box in 1.5x the time trilinear `F.interpolate` takes and
boxes of 200^3 or less in the same time or half of it, where `F.adaptive_avg_pool3d` took 4x as
long; a whole FM-CT sample costs less than with trilinear (`docs/datapath.md`).

Box placement:
- `"foreground"` (default): each box's centre lies on a foreground voxel (HU > `foreground_hu`) and
  the box is kept inside the head's bounding box (or, when larger, around it); with
  `fit_to_foreground` the box edge is also capped at the head's extent, so a "224^3" global view of
  a 170 mm head is the whole head, not the head plus 54 mm of air.
- `"uniform"`: anywhere in the volume, as in the papers' code. FM-CT padded its cached 96^3 volume
  to 224^3 before cropping, so 81% of each global crop was zero padding (`bench/baseline_fmct.py`
  reproduces that pipeline).

Everything is a function of (volume, numpy Generator), so it is unit-testable without Ray.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

# Boxes are sampled against a stride-4 foreground mask: 56^3 voxels instead of 224^3 (under 1 ms),
# accurate to a few voxels, which is all box placement needs.
_MASK_STRIDE = 4
# Output rows per matrix product of the separable area resampler: with 16 rows a band of a 224 -> 96
# axis spans about 40 inputs, 5x fewer multiply-adds than the dense 96 x 224 matrix.
_BLOCK = 16

ResizeMode = Literal["area", "trilinear"]


@dataclass(frozen=True)
class MultiCropConfig:
    """How many views of a scan to cut, how big their boxes are and where they go.

    Args:
        n_global: global views per scan.
        global_box: (min, max) box edge in voxels of a global view.
        global_size: edge of a global view after resizing.
        n_local: local views per scan (0 for MAE).
        local_box: (min, max) box edge in voxels of a local view.
        local_size: edge of a local view after resizing.
        box_shape: "per_axis" draws each edge independently (MONAI RandSpatialCrop(random_size=True),
            what FM-CT's MONAI code does); "cube" draws one edge for all three axes (VoxelFM keeps the
            aspect ratio).
        placement: "foreground" keeps boxes on the head; "uniform" places them anywhere (the papers).
        foreground_hu: voxels above this HU are foreground (SPEC section 1: about -500).
        fit_to_foreground: with foreground placement, cap box edges at the head's extent per axis.
        min_foreground: with foreground placement, redraw a box (up to `max_tries` draws, keeping the
            best) while less than this fraction of it is head.
        max_tries: draws per box for `min_foreground`.
        resize: "area" (anti-aliased downsampling, linear upsampling; FM-CT, MONAI `Resize`'s
            default) or "trilinear" (VoxelFM); see the module docstring.
    """

    n_global: int = 2
    global_box: tuple[int, int] = (112, 224)
    global_size: int = 96
    n_local: int = 3
    local_box: tuple[int, int] = (64, 112)
    local_size: int = 96
    box_shape: Literal["per_axis", "cube"] = "per_axis"
    placement: Literal["foreground", "uniform"] = "foreground"
    foreground_hu: float = -500.0
    fit_to_foreground: bool = True
    min_foreground: float = 0.5
    max_tries: int = 8
    resize: ResizeMode = "area"

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        for name in ("global_box", "local_box"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if self.global_size < 1 or self.local_size < 1:
            raise ValueError("global_size and local_size must be positive")
        if not 0.0 <= self.min_foreground <= 1.0 or self.max_tries < 1:
            raise ValueError("need 0 <= min_foreground <= 1 and max_tries >= 1")


def fmct_multicrop(**overrides) -> MultiCropConfig:
    """FM-CT DINO (Zhu et al. 2026): 2 global 112-224^3 and 3 local 64-112^3 boxes, all to 96^3."""
    return MultiCropConfig(**overrides)


def voxelfm_multicrop(**overrides) -> MultiCropConfig:
    """VoxelFM DINOv2: 2 global views at 112^3, 8 local at 56^3; cubic boxes whose edge is 32-100%
    (global) or 5-32% (local) of the 224 volume edge, as in VoxelFM's `RandomCrop3D` crop scales;
    trilinear resizing."""
    base = dict(
        n_global=2, global_box=(72, 224), global_size=112, n_local=8, local_box=(11, 72), local_size=56
    )
    return MultiCropConfig(**{**base, "box_shape": "cube", "resize": "trilinear", **overrides})


def mae_multicrop(**overrides) -> MultiCropConfig:
    """MAE: one 96^3 view per scan from a large box (no local views)."""
    base = dict(n_global=1, global_box=(160, 224), global_size=96, n_local=0, local_size=96)
    return MultiCropConfig(**{**base, **overrides})


CROP_PRESETS = {"fmct": fmct_multicrop, "voxelfm": voxelfm_multicrop, "mae": mae_multicrop}


@dataclass(frozen=True)
class Foreground:
    """Where the head is, from a strided foreground mask: bounding box [lo, hi) per axis, foreground
    voxel coordinates on the stride grid, and a summed-volume table of the mask for O(1) box sums."""

    lo: np.ndarray  # (3,) int
    hi: np.ndarray  # (3,) int
    coords: np.ndarray  # (N, 3) int
    table: np.ndarray  # (n0 + 1, n1 + 1, n2 + 1) int, table[i, j, k] = mask[:i, :j, :k].sum()
    stride: int = _MASK_STRIDE

    @property
    def empty(self) -> bool:
        return len(self.coords) == 0

    def fraction(self, start: np.ndarray, stop: np.ndarray) -> float:
        """Approximate foreground fraction of the box [start, stop) (grid points inside it)."""
        a = -(-np.asarray(start) // self.stride)  # first grid point at or after start
        b = np.maximum(-(-np.asarray(stop) // self.stride), a)
        t = self.table
        total = (
            t[b[0], b[1], b[2]]
            - t[a[0], b[1], b[2]]
            - t[b[0], a[1], b[2]]
            - t[b[0], b[1], a[2]]
            + t[a[0], a[1], b[2]]
            + t[a[0], b[1], a[2]]
            + t[b[0], a[1], a[2]]
            - t[a[0], a[1], a[2]]
        )
        return float(total) / max(int(np.prod(b - a)), 1)


def find_foreground(
    volume: np.ndarray, threshold_hu: float = -500.0, stride: int = _MASK_STRIDE
) -> Foreground:
    """Foreground bounding box, sample points and box-sum table of `volume`, from a strided mask."""
    mask = volume[::stride, ::stride, ::stride] > threshold_hu
    coords = np.argwhere(mask) * stride
    table = np.pad(mask.cumsum(0).cumsum(1).cumsum(2), ((1, 0), (1, 0), (1, 0)))
    shape = np.asarray(volume.shape)
    if len(coords) == 0:
        return Foreground(np.zeros(3, int), shape.copy(), coords, table, stride)
    # The strided grid can miss up to stride-1 voxels of the head at either end of each axis.
    lo = np.maximum(coords.min(axis=0) - (stride - 1), 0)
    hi = np.minimum(coords.max(axis=0) + stride, shape)
    return Foreground(lo, hi, coords, table, stride)


def foreground_fraction(volume: np.ndarray, threshold_hu: float = -500.0) -> float:
    """Fraction of voxels above `threshold_hu` (how much of a crop or box is head, not air)."""
    return float(np.count_nonzero(volume > threshold_hu)) / max(volume.size, 1)


@functools.lru_cache(maxsize=4096)
def _axis_weights(n: int, m: int, mode: ResizeMode) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """Resampling of one axis from n to m voxels as the nonzero bands of its (m, n) weight matrix W:
    (a0, a1, j0, j1, W[a0:a1, j0:j1]) for each block of `_BLOCK` output rows.

    "area" with m < n: row i averages the inputs [floor(i n / m), ceil((i + 1) n / m)), adaptive
    average pooling. Otherwise linear interpolation with align_corners=False, the 1-D factor of
    trilinear `F.interpolate`.
    """
    w = np.zeros((m, n))
    i = np.arange(m)
    if mode == "area" and m < n:
        start, stop = i * n // m, -(-(i + 1) * n // m)
        for k in range(m):
            w[k, start[k] : stop[k]] = 1.0 / (stop[k] - start[k])
    else:
        src = np.maximum((i + 0.5) * n / m - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        np.add.at(w, (i, lo), 1.0 - (src - lo))
        np.add.at(w, (i, np.minimum(lo + 1, n - 1)), src - lo)
    blocks = []
    for a0 in range(0, m, _BLOCK):
        a1 = min(a0 + _BLOCK, m)
        cols = np.flatnonzero(w[a0:a1].any(axis=0))
        j0, j1 = int(cols[0]), int(cols[-1]) + 1
        blocks.append((a0, a1, j0, j1, torch.from_numpy(w[a0:a1, j0:j1].astype(np.float32))))
    return tuple(blocks)


def _resample_axis(x: torch.Tensor, dim: int, m: int, mode: ResizeMode) -> torch.Tensor:
    """Resample axis `dim` of the 3-D float tensor `x` to `m` voxels (banded matrix products)."""
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = m
    out = torch.empty(shape, dtype=x.dtype)
    for a0, a1, j0, j1, w in _axis_weights(n, m, mode):
        if dim == 0:  # one matrix product over the contiguous (n, H * W) layout
            torch.mm(w, x[j0:j1].reshape(j1 - j0, -1), out=out[a0:a1].view(a1 - a0, -1))
        elif dim == 1:
            out[:, a0:a1] = torch.matmul(w, x[:, j0:j1])
        else:
            out[:, :, a0:a1] = torch.matmul(x[:, :, j0:j1], w.T)
    return out


def resize_box(
    box: np.ndarray | torch.Tensor,
    size: int,
    scratch: torch.Tensor | None = None,
    mode: ResizeMode = "area",
) -> np.ndarray:
    """Resize an int16 box (any shape) to int16 (size, size, size).

    `mode`: "area" (anti-aliased where an axis shrinks, linear where it grows) or "trilinear"; see
    the module docstring. `scratch`, a float32 tensor of at least box.size elements, avoids a fresh
    allocation per call.
    """
    if mode not in ("area", "trilinear"):
        raise ValueError(f"resize mode must be 'area' or 'trilinear', got {mode!r}")
    src = torch.as_tensor(box)
    n = src.numel()
    if scratch is not None and scratch.numel() >= n:
        out = scratch[:n].view(src.shape).copy_(src)
    else:
        out = src.to(torch.float32)
    if mode == "trilinear" and tuple(src.shape) != (size,) * 3:
        out = F.interpolate(out[None, None], size=(size,) * 3, mode="trilinear", align_corners=False)
        out = out[0, 0]
    elif mode == "area":
        # Shrinking axes first (the most first), so the later products run on the smaller tensor.
        for dim in sorted(range(3), key=lambda d: size / src.shape[d]):
            if src.shape[dim] != size:
                out = _resample_axis(out, dim, size, mode)
    # Every output value is a convex combination of int16 values, so rounding cannot overflow.
    return out.round_().to(torch.int16).numpy()


class MultiCrop:
    """Cut the views of one scan: `MultiCrop(cfg)(volume, rng)` -> {"global", "local"} int16 arrays.

    "global" is (n_global, S, S, S) and "local" (n_local, s, s, s), S = cfg.global_size,
    s = cfg.local_size. Not thread-safe (one scratch buffer per instance); pickles without it.
    """

    def __init__(self, cfg: MultiCropConfig) -> None:
        self.cfg = cfg
        self._scratch: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "_scratch": None}

    def __call__(self, volume: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if volume.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
        boxes = self.sample_boxes(volume, rng)
        cfg = self.cfg
        sizes = [cfg.global_size] * cfg.n_global + [cfg.local_size] * cfg.n_local
        crops = [self._crop(volume, b, s) for b, s in zip(boxes, sizes, strict=True)]
        out = {"global": np.stack(crops[: cfg.n_global])}
        local = crops[cfg.n_global :]
        out["local"] = np.stack(local) if local else np.empty((0,) + (cfg.local_size,) * 3, np.int16)
        return out

    def sample_boxes(self, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The boxes __call__ would cut with this rng state: int (n_global + n_local, 2, 3) of
        (start, stop) per axis, global boxes first."""
        cfg = self.cfg
        shape = np.asarray(volume.shape)
        fg = find_foreground(volume, cfg.foreground_hu) if cfg.placement == "foreground" else None
        ranges = [cfg.global_box] * cfg.n_global + [cfg.local_box] * cfg.n_local
        return np.stack([self._one_box(shape, r, fg, rng) for r in ranges])

    def _one_box(
        self, shape: np.ndarray, edge: tuple[int, int], fg: Foreground | None, rng: np.random.Generator
    ) -> np.ndarray:
        if fg is None or fg.empty:
            return self._draw_box(shape, edge, None, rng)
        best, best_frac = None, -1.0
        for _ in range(self.cfg.max_tries):
            box = self._draw_box(shape, edge, fg, rng)
            frac = fg.fraction(box[0], box[1])
            if frac > best_frac:
                best, best_frac = box, frac
            if frac >= self.cfg.min_foreground:
                break
        return best

    def _draw_box(
        self, shape: np.ndarray, edge: tuple[int, int], fg: Foreground | None, rng: np.random.Generator
    ) -> np.ndarray:
        lo_edge, hi_edge = np.full(3, edge[0]), np.full(3, edge[1])
        if fg is not None and self.cfg.fit_to_foreground:
            extent = fg.hi - fg.lo
            cap = extent.max() if self.cfg.box_shape == "cube" else extent
            hi_edge = np.minimum(hi_edge, np.maximum(lo_edge, cap))
        n_draw = 1 if self.cfg.box_shape == "cube" else 3
        size = rng.integers(lo_edge[:n_draw], hi_edge[:n_draw] + 1) * np.ones(3, int)
        size = np.minimum(size, shape)
        start = (
            self._start_on_head(shape, size, fg, rng) if fg is not None else rng.integers(0, shape - size + 1)
        )
        return np.stack([start, start + size])

    @staticmethod
    def _start_on_head(
        shape: np.ndarray, size: np.ndarray, fg: Foreground, rng: np.random.Generator
    ) -> np.ndarray:
        centre = fg.coords[rng.integers(len(fg.coords))] + rng.integers(0, _MASK_STRIDE, 3)
        start = centre - size // 2
        # A box no bigger than the head stays inside its bounding box; a bigger one covers it.
        a, b = np.minimum(fg.lo, fg.hi - size), np.maximum(fg.lo, fg.hi - size)
        start = np.clip(start, a, b)
        return np.clip(start, 0, shape - size)

    def _crop(self, volume: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1) = box
        view = volume[z0:z1, y0:y1, x0:x1]
        if self._scratch is None or self._scratch.numel() < view.size:
            self._scratch = torch.empty(int(np.prod(self._max_box(volume.shape))), dtype=torch.float32)
        return resize_box(view, size, self._scratch, self.cfg.resize)

    def _max_box(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.minimum(max(self.cfg.global_box[1], self.cfg.local_box[1]), np.asarray(shape))


def eval_view(volume: np.ndarray, crop: int = 192, size: int = 96, mode: ResizeMode = "area") -> np.ndarray:
    """SPEC section 1 evaluation input: the centre crop^3 of the volume resized to int16 size^3
    (area resizing by default, as FM-CT's MONAI `Resize`; 192 -> 96 averages 2x2x2 blocks)."""
    if any(n < crop for n in volume.shape):
        raise ValueError(f"volume {volume.shape} is smaller than the {crop}^3 centre crop")
    start = [(n - crop) // 2 for n in volume.shape]
    box = volume[tuple(slice(s, s + crop) for s in start)]
    return resize_box(box, size, mode=mode)
