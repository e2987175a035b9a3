"""Cohort and sanity gates of SPEC section 1: a scan that fails raises `QuarantineError` with the reason.

`check_header` applies the paper's cohort filters to the header facts in `RawScan.meta`, each only
where the header says (NIfTI files carry no modality, thickness or kVp, so those gates pass): CT
modality, at least 10 slices, slice thickness 0.5-5 mm, kVp 70-150, no missing slice.

`check_intensities` checks that the values are Hounsfield units of a head CT as acquired:
- not an 8-bit display image (every value within [0, 255]);
- no background zeroed by post-processing (more than `max_zero_fraction` of voxels exactly 0 HU);
- air present: at least `min_air_fraction` of voxels in `air_range_hu` (about -1000 HU). Stored values
  without their rescale intercept (air near 0) or with a wrong slope fail here.

Decision on skull-stripped / masked inputs (e.g. the ichseg template in ../shared/data/real/, 0 outside
the brain, no air at all): quarantined by default, with a reason naming the zeroed background. The
models are pretrained on whole heads in the three FM-CT windows (brain, subdural, bone), so a brain
cut out of its skull and set on 0 HU would be an out-of-distribution input that the bone and subdural
windows render as a flat grey slab; silently mixing such inputs into a pretraining store is the worse
failure. A site that wants them (templates, atlases, pre-masked research sets) sets
`require_air: false`, which skips the air and zeroed-background gates; the 0-255 display-image gate
and the header gates still apply. Such volumes are then stored as given (0 HU background inside the
box, -1024 padding outside the scan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fmct_ray.ingest.readers import DEFAULT_MAX_GAP_FACTOR, QuarantineError

_SAMPLE_VOXELS = 4_000_000  # intensity statistics on a strided sample of at most about this many voxels


@dataclass(frozen=True)
class QualityConfig:
    """Gates with SPEC defaults; every one is configurable.

    Args:
        modalities: allowed DICOM Modality values (unknown modality passes).
        min_slices: fewest axial slices.
        slice_thickness_mm: allowed SliceThickness range where the header has it.
        kvp: allowed KVP range where the header has it.
        max_gap_factor: a step larger than this multiple of the median step is a missing slice.
        require_air: demand air and reject zeroed backgrounds (see the module docstring).
        air_range_hu: HU range counted as air.
        min_air_fraction: fewest voxels in `air_range_hu`.
        max_zero_fraction: most voxels exactly 0 HU before the image counts as background-zeroed.
    """

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 10
    slice_thickness_mm: tuple[float, float] = (0.5, 5.0)
    kvp: tuple[float, float] = (70.0, 150.0)
    max_gap_factor: float = DEFAULT_MAX_GAP_FACTOR
    require_air: bool = True
    air_range_hu: tuple[float, float] = (-1100.0, -900.0)
    min_air_fraction: float = 0.01
    max_zero_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in ("slice_thickness_mm", "kvp", "air_range_hu"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} above upper bound {hi}")
        if self.max_gap_factor <= 1:
            raise ValueError(f"max_gap_factor must be > 1, got {self.max_gap_factor}")


def _in_range(name: str, value: Any, bounds: tuple[float, float], unit: str) -> None:
    if value is None:
        return
    lo, hi = bounds
    if not lo <= float(value) <= hi:
        raise QuarantineError(f"{name} {float(value):g} {unit} outside the allowed {lo:g}-{hi:g} {unit}")


def check_header(meta: dict[str, Any], cfg: QualityConfig | None = None) -> None:
    """Cohort gates on header facts; raises QuarantineError naming the failed gate."""
    cfg = cfg or QualityConfig()
    modality = meta.get("modality")
    if modality is not None and modality.upper() not in {m.upper() for m in cfg.modalities}:
        raise QuarantineError(f"modality {modality!r} is not one of {list(cfg.modalities)}")
    n_slices = int(meta["n_slices"])
    if n_slices < cfg.min_slices:
        raise QuarantineError(f"{n_slices} slices, fewer than the minimum {cfg.min_slices}")
    _in_range("slice thickness", meta.get("slice_thickness"), cfg.slice_thickness_mm, "mm")
    _in_range("kVp", meta.get("kvp"), cfg.kvp, "kV")
    ratio = meta.get("max_gap_ratio")
    if ratio is not None and ratio > cfg.max_gap_factor:
        raise QuarantineError(
            f"missing slice(s): a gap {ratio:.2f}x the typical slice step "
            f"(max gap factor {cfg.max_gap_factor})"
        )
    if any(float(s) <= 0 for s in meta["spacing"]):
        raise QuarantineError(f"zero or negative spacing {tuple(meta['spacing'])}")


def _sample(array: np.ndarray) -> np.ndarray:
    stride = max(1, int(np.ceil((array.size / _SAMPLE_VOXELS) ** (1 / 3))))
    return array[::stride, ::stride, ::stride] if array.ndim == 3 else array


def check_intensities(array_hu: np.ndarray, cfg: QualityConfig | None = None) -> None:
    """HU sanity gates (see the module docstring); raises QuarantineError with the reason."""
    cfg = cfg or QualityConfig()
    sample = _sample(np.asarray(array_hu))
    lo, hi = float(sample.min()), float(sample.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise QuarantineError("intensities contain NaN or inf")
    if hi - lo < 1:
        raise QuarantineError(f"constant image (all voxels {lo:g})")
    if lo >= 0 and hi <= 255:
        raise QuarantineError(f"values within [{lo:g}, {hi:g}]: looks like an 8-bit display image, not HU")
    if not cfg.require_air:
        return
    zeros = float(np.mean(sample == 0))
    air = float(np.mean((sample >= cfg.air_range_hu[0]) & (sample <= cfg.air_range_hu[1])))
    if zeros > cfg.max_zero_fraction:
        raise QuarantineError(
            f"background set to 0: {zeros:.0%} of voxels are exactly 0 HU and {air:.1%} are air "
            "(skull-stripped or masked image; set require_air: false to admit it)"
        )
    if air < cfg.min_air_fraction:
        low = float(np.percentile(sample, 1))
        why = "not HU as acquired (wrong rescale?)"
        if low > -200:
            why = f"no negative values (1st percentile {low:g}): stored values without rescale, or not CT"
        raise QuarantineError(
            f"only {air:.2%} of voxels are air ({cfg.air_range_hu[0]:g} to "
            f"{cfg.air_range_hu[1]:g} HU), minimum {cfg.min_air_fraction:.0%}: {why}"
        )
