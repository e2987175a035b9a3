"""Raw scans -> `RawScan`: a float32 HU voxel grid with its RAS+ affine and non-identifying header facts.

This module owns the first step of SPEC section 1: reading NIfTI files and DICOM series into Hounsfield
units on a (uniform) voxel grid, and turning every unreadable or malformed input into a
`QuarantineError` with a human-readable reason (truncated gzip, empty file, non-image bytes, 2D or 4D
images, NaNs, zero spacing, missing or duplicate slices, mixed orientations). Nothing here crashes on
bad input with a bare exception: the ingest job records the reason and goes on.

Privacy: `RawScan.meta` holds only acquisition facts (modality, thickness, kVp, manufacturer, geometry).
The raw PatientID and SeriesInstanceUID are kept apart in `patient_key` / `series_key`, which the caller
turns into keyed hashes and never writes, and the real scan time (a date is an identifier) in
`acquired` (fallback order in `scan_time`; NIfTI has none), which the caller date-shifts (`privacy`)
before writing. Exception messages never contain header identity fields.

DICOM conventions: a slice's pixel (row r, column c) lies at IPP + c * PixelSpacing[1] * row_cosine +
r * PixelSpacing[0] * column_cosine in LPS millimetres; slices are ordered by IPP projected on the
normal row_cosine x column_cosine (never by file or instance number). The returned grid is indexed
[column, row, slice] and its affine is converted LPS -> RAS (nibabel's convention). Gantry tilt is kept
exactly: the third affine column is the fitted step between slice origins, which need not be parallel
to the normal. Non-uniform slice spacing (the InVesalius sample has one 1.0 mm step among 1.5 mm steps)
is resampled here, linearly along the slice axis, onto a uniform grid spanning the first to the last
slice, so every later step sees a plain grid + affine. `meta["spacing"]` and `meta["shape"]` describe the
series as acquired (median slice step, number of files) for the manifest; the grid itself is `affine`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nibabel as nib
import numpy as np

from fmct_ray.ingest.scan_time import header_times, series_time

# A step larger than this multiple of the typical (median) step means a slice is missing.
DEFAULT_MAX_GAP_FACTOR = 1.5
_DUPLICATE_MM = 0.01  # slices closer than this along the normal are duplicates
_LINE_TOLERANCE_MM = 0.5  # slice origins must lie on one line (gantry tilt allowed) within this
_UNIFORM_TOLERANCE = 0.01  # relative deviation from the median step still treated as uniform


class QuarantineError(ValueError):
    """An input that cannot or must not be ingested; `reason` says why in plain words."""

    def __init__(self, reason: str, source: str | None = None):
        self.reason, self.source = reason, source
        super().__init__(f"{source}: {reason}" if source else reason)


@dataclass
class RawScan:
    """A scan in HU on its own voxel grid.

    Args:
        array: float32 HU, indexed like the voxel grid of `affine`.
        affine: 4x4 voxel -> world (RAS+ mm, nibabel convention).
        meta: non-identifying header facts (see module docstring).
        patient_key: raw PatientID for the caller's keyed hash only; never written.
        series_key: raw SeriesInstanceUID for the caller's keyed hash only; never written.
        acquired: real scan time (naive local time, DICOM only); written only date-shifted.
        study_key: raw StudyInstanceUID (keyed hash only; series of one study share it).
        instance_keys: raw SOPInstanceUIDs of the slices, in slice order (keyed hashes only: public
            label files such as RSNA 2019's label slices, not series).
        description: raw SeriesDescription, matched against the series-selection patterns; never
            written (free text may identify).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    patient_key: str | None = None
    series_key: str | None = None
    acquired: datetime | None = None
    study_key: str | None = None
    instance_keys: tuple[str, ...] = ()
    description: str | None = None


def grid_meta(array: np.ndarray, affine: np.ndarray, **facts: Any) -> dict[str, Any]:
    """Geometry facts of a voxel grid: spacing, shape, axis codes, number of axial slices."""
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    # The slice axis is the voxel axis closest to world S (axial acquisitions).
    slice_axis = int(np.argmax(np.abs(affine[2, :3]) / np.maximum(spacing, 1e-12)))
    meta = {"modality": None, "slice_thickness": None, "kvp": None, "manufacturer": None, "kernel": None}
    meta.update(facts)
    meta.update(
        spacing=spacing,
        shape=tuple(int(s) for s in array.shape),
        orientation="".join(nib.aff2axcodes(affine)),
        n_slices=int(array.shape[slice_axis]),
    )
    return meta


def check_grid(array: np.ndarray, affine: np.ndarray, source: str | None) -> None:
    """Reject non-3D arrays, non-finite values and degenerate affines."""
    if array.ndim != 3 or min(array.shape) < 2:
        kind = "2D image" if array.ndim <= 3 else f"{array.ndim}D image"
        raise QuarantineError(f"{kind} (shape {tuple(array.shape)}), expected one 3D volume", source)
    if not np.all(np.isfinite(affine)):
        raise QuarantineError("affine contains NaN or inf", source)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise QuarantineError(
            f"zero voxel spacing or degenerate affine (spacing {np.round(spacing, 4)})", source
        )
    bad = np.size(array) - np.count_nonzero(np.isfinite(array))
    if bad:
        raise QuarantineError(f"{bad} voxels are NaN or inf", source)


# -- NIfTI ----------------------------------------------------------------------------------------
def _nifti_payload(data: bytes, source: str) -> bytes:
    if not data:
        raise QuarantineError("empty file", source)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise QuarantineError(f"truncated or corrupt gzip stream ({err})", source) from err
    if len(data) < 348:
        raise QuarantineError(f"not a NIfTI file ({len(data)} bytes, shorter than a NIfTI header)", source)
    return data


def _nifti_image(data: bytes, source: str) -> nib.Nifti1Image:
    sizes = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    cls = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
    if cls is None:
        raise QuarantineError("not a NIfTI file (no NIfTI-1/2 header size)", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = cls.from_bytes(data)
    except Exception as err:  # nibabel raises many types on garbage headers
        raise QuarantineError(f"unreadable NIfTI header ({type(err).__name__}: {err})", source) from err
    magic = bytes(img.header["magic"]).rstrip(b"\0")
    if magic not in (b"n+1", b"n+2"):
        raise QuarantineError(f"not a single-file NIfTI (magic {magic!r})", source)
    # nibabel silently repairs zero (-> 1) and negative (-> abs) voxel sizes; a file that needs it is broken.
    zooms = cls.header_class.from_fileobj(io.BytesIO(data), check=False)["pixdim"][1:4]
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise QuarantineError(f"zero or negative voxel size in header ({tuple(map(float, zooms))})", source)
    return img


def read_nifti(data: bytes, source: str) -> RawScan:
    """Read the bytes of a `.nii` / `.nii.gz` into HU (scl_slope/scl_inter applied) with its affine.

    Args:
        data: the whole file.
        source: path or URI, used in error messages only.
    """
    img = _nifti_image(_nifti_payload(data, source), source)
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise QuarantineError("NIfTI has neither qform nor sform: orientation unknown", source)
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise QuarantineError(f"{len(shape)}D image (shape {shape}), expected one 3D volume", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as err:  # truncated data, unknown dtypes
        raise QuarantineError(f"unreadable NIfTI image data ({type(err).__name__}: {err})", source) from err
    if array.ndim < 3:
        array = array.reshape(array.shape + (1,) * (3 - array.ndim))
    affine = np.asarray(img.affine, dtype=np.float64)
    check_grid(array, affine, source)
    return RawScan(array=array, affine=affine, meta=grid_meta(array, affine, source_format="nifti"))


# -- DICOM ----------------------------------------------------------------------------------------
def _floats(ds: Any, keyword: str, n: int | None = None) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if (n is not None and len(values) != n) or not all(np.isfinite(values)):
        return None
    return values


def _first(ds: Any, keyword: str) -> float | None:
    values = _floats(ds, keyword)
    return values[0] if values else None


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    return str(value).strip() or None


def _joined(ds: Any, keyword: str) -> str | None:
    """A text field that may be multi-valued (ConvolutionKernel "FC23\\AXIAL"), values joined by "\\"."""
    value = ds.get(keyword)
    if value is None or isinstance(value, str | bytes):
        return _text(ds, keyword)
    return "\\".join(str(v).strip() for v in value) or None


def _twelve_bit_wrap(ds: Any, intercept: float | None) -> bool:
    """RSNA 2019's known header quirk: 12-bit two's-complement pixels flagged unsigned
    (PixelRepresentation 0) with a RescaleIntercept near 0 instead of about -1000, so that air reads
    about +3096. The dataset's standard correction (`_slice_hu`) applies to exactly these slices."""
    bits, representation = _first(ds, "BitsStored"), _first(ds, "PixelRepresentation")
    return bits == 12 and representation == 0 and intercept is not None and intercept > -100


@contextlib.contextmanager
def _lenient():
    """pydicom without its value validation and warnings while a file is read: RSNA 2019's ids
    (ID_<hex>) are not valid UIDs, and validating and logging each costs more than the parse; the
    readers check the fields they use themselves."""
    from pydicom import config

    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = mode


def _parse_dicom(data: bytes, source: str, pixels: bool) -> Any:
    import pydicom

    if not data:
        raise QuarantineError("empty file", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels, force=True)
    except Exception as err:  # pydicom raises many types on garbage input
        raise QuarantineError(f"not a readable DICOM file ({type(err).__name__})", source) from err


def _header_from_ds(ds: Any, source: str) -> dict[str, Any]:
    geometry = {
        "position": _floats(ds, "ImagePositionPatient", 3),
        "orientation": _floats(ds, "ImageOrientationPatient", 6),
        "pixel_spacing": _floats(ds, "PixelSpacing", 2),
        "rows": _first(ds, "Rows"),
        "columns": _first(ds, "Columns"),
    }
    missing = [k for k, v in geometry.items() if v is None]
    if missing:
        raise QuarantineError(f"not a DICOM image slice (missing or invalid {', '.join(missing)})", source)
    if min(geometry["pixel_spacing"]) <= 0:
        raise QuarantineError(f"zero or negative PixelSpacing {geometry['pixel_spacing']}", source)
    frames = _first(ds, "NumberOfFrames")
    intercept = _first(ds, "RescaleIntercept")
    return {
        **geometry,
        "rows": int(geometry["rows"]),
        "columns": int(geometry["columns"]),
        "series_key": _text(ds, "SeriesInstanceUID"),
        "patient_key": _text(ds, "PatientID"),
        "study_key": _text(ds, "StudyInstanceUID"),
        "instance_key": _text(ds, "SOPInstanceUID"),
        "kernel": _joined(ds, "ConvolutionKernel"),
        "description": _text(ds, "SeriesDescription"),
        "twelve_bit_wrap": _twelve_bit_wrap(ds, intercept),
        "instance_number": _first(ds, "InstanceNumber"),
        "number_of_frames": int(frames) if frames else 1,
        "modality": _text(ds, "Modality"),
        "slice_thickness": _first(ds, "SliceThickness"),
        "kvp": _first(ds, "KVP"),
        "manufacturer": _text(ds, "Manufacturer"),
        "rescale_slope": _first(ds, "RescaleSlope") or 1.0,
        "rescale_intercept": intercept or 0.0,
        "times": header_times(ds),
        "source": source,
    }


def read_dicom_header(data: bytes, source: str) -> dict[str, Any]:
    """Header of one DICOM file (pixels not read): grouping keys and what sorting/stacking needs.

    Returns a dict with `series_key` (SeriesInstanceUID) and `patient_key` (PatientID) for the caller's
    keyed hashes, geometry (`position`, `orientation`, `pixel_spacing`, `rows`, `columns`),
    acquisition facts (`modality`, `slice_thickness`, `kvp`, `manufacturer`, rescale) and `times`
    (acquisition, series, study datetimes or None; identifying, see `series_time`).
    """
    with _lenient():
        return _header_from_ds(_parse_dicom(data, source, pixels=False), source)


@dataclass(frozen=True)
class SliceGeometry:
    """Slices of one series ordered along the normal: order, positions (mm) and stacking."""

    order: tuple[int, ...]  # indices into the headers, sorted by position along the normal
    positions: tuple[float, ...]  # sorted positions along the normal, mm
    step: float  # median step, mm
    max_gap_ratio: float  # largest step / median step
    uniform: bool
    origin: np.ndarray  # LPS position of the first slice (fitted)
    direction: np.ndarray  # LPS displacement per mm along the normal (== normal without tilt)


def slice_geometry(
    headers: list[dict[str, Any]], max_gap_factor: float = DEFAULT_MAX_GAP_FACTOR, source: str | None = None
) -> SliceGeometry:
    """Order slices by ImagePositionPatient along the normal; reject duplicates and missing slices."""
    if len(headers) < 2:
        raise QuarantineError(f"{len(headers)} slice(s): a 2D image, not a volume", source)
    iop = np.asarray(headers[0]["orientation"], dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.asarray([h["position"] for h in headers], dtype=np.float64)
    dist = ipp @ normal
    order = np.argsort(dist, kind="stable")
    dist, ipp = dist[order], ipp[order]
    steps = np.diff(dist)
    if np.any(steps < _DUPLICATE_MM):
        at = dist[1:][steps < _DUPLICATE_MM][0]
        raise QuarantineError(
            f"duplicate slice positions ({int(np.sum(steps < _DUPLICATE_MM))} pairs, "
            f"first at {at:.2f} mm along the slice normal)",
            source,
        )
    step = float(np.median(steps))
    ratio = float(steps.max() / step)
    if ratio > max_gap_factor:
        k = int(np.argmax(steps))
        raise QuarantineError(
            f"missing slice(s): gap of {steps[k]:.2f} mm between slices at {dist[k]:.2f} and "
            f"{dist[k + 1]:.2f} mm, typical step {step:.2f} mm (max gap factor "
            f"{max_gap_factor})",
            source,
        )
    # Fit ipp = origin + t * direction: direction == normal without tilt, sheared with gantry tilt.
    design = np.stack([np.ones_like(dist), dist - dist[0]], axis=1)
    coef, *_ = np.linalg.lstsq(design, ipp, rcond=None)
    if np.abs(design @ coef - ipp).max() > _LINE_TOLERANCE_MM:
        raise QuarantineError(
            "slice origins do not lie on one line (mixed stacks or corrupt positions)", source
        )
    uniform = bool(np.abs(steps - step).max() <= _UNIFORM_TOLERANCE * step)
    return SliceGeometry(
        tuple(int(i) for i in order), tuple(float(d) for d in dist), step, ratio, uniform, coef[0], coef[1]
    )


def _check_consistent(headers: list[dict[str, Any]], source: str | None) -> None:
    first = headers[0]
    if len({h["series_key"] for h in headers}) > 1:
        raise QuarantineError("files from more than one series passed as one series", source)
    if any(h["number_of_frames"] > 1 for h in headers):
        raise QuarantineError("multi-frame DICOM is not supported", source)
    for h in headers[1:]:
        if not np.allclose(h["orientation"], first["orientation"], atol=1e-4):
            raise QuarantineError("mixed slice orientations within the series", source)
        if (h["rows"], h["columns"]) != (first["rows"], first["columns"]):
            raise QuarantineError("mixed slice sizes within the series", source)
        if not np.allclose(h["pixel_spacing"], first["pixel_spacing"], rtol=1e-4):
            raise QuarantineError("mixed pixel spacing within the series", source)
    iop = np.asarray(first["orientation"])
    if (
        abs(np.linalg.norm(iop[:3]) - 1) > 1e-2
        or abs(np.linalg.norm(iop[3:]) - 1) > 1e-2
        or abs(iop[:3] @ iop[3:]) > 1e-2
    ):
        raise QuarantineError(f"invalid ImageOrientationPatient {tuple(iop)}", source)


def _slice_hu(ds: Any, header: dict[str, Any], out: np.ndarray) -> None:
    """Decode one slice into `out` (rows, columns) as HU."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise QuarantineError("colour (multi-sample) image, not CT", header["source"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as err:  # missing pixel data, unsupported transfer syntax, truncated file
        raise QuarantineError(
            f"cannot decode pixel data ({type(err).__name__}: {err})", header["source"]
        ) from err
    if pixels.shape != out.shape:
        raise QuarantineError(
            f"pixel data shape {pixels.shape} does not match Rows/Columns", header["source"]
        )
    intercept = header["rescale_intercept"]
    if header["twelve_bit_wrap"]:  # (stored + 1000) mod 4096, intercept -1000 (see _twelve_bit_wrap)
        pixels = (pixels.astype(np.int32) + 1000) % 4096
        intercept = -1000.0
    np.multiply(pixels, np.float32(header["rescale_slope"]), out=out, casting="unsafe")
    out += np.float32(intercept)


def _to_uniform(volume: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, float]:
    """Linear resampling along axis 0 onto a uniform grid spanning the first..last position."""
    n = int(round((positions[-1] - positions[0]) / float(np.median(np.diff(positions))))) + 1
    grid = np.linspace(positions[0], positions[-1], n)
    upper = np.clip(np.searchsorted(positions, grid, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((grid - positions[lower]) / (positions[upper] - positions[lower])).astype(np.float32)
    out = np.empty((n,) + volume.shape[1:], dtype=np.float32)
    for m in range(n):
        np.multiply(volume[lower[m]], 1 - weight[m], out=out[m])
        out[m] += volume[upper[m]] * weight[m]
    return out, float(grid[1] - grid[0])


def _series_source(files: list[tuple[str, bytes]]) -> str | None:
    try:
        return os.path.commonpath([os.path.dirname(p) for p, _ in files]) or None
    except ValueError:
        return None


def read_dicom_series(
    files: list[tuple[str, bytes]], max_gap_factor: float = DEFAULT_MAX_GAP_FACTOR
) -> RawScan:
    """Read one DICOM series (list of (path, bytes)) into a HU volume on a uniform grid, RAS affine.

    Args:
        files: every file of the series, in any order.
        max_gap_factor: a step between neighbouring slices larger than this multiple of the median
            step is a missing slice (pass `QualityConfig.max_gap_factor`).
    """
    source = _series_source(files)
    if not files:
        raise QuarantineError("empty DICOM series", source)
    with _lenient():
        datasets = [_parse_dicom(data, path, pixels=True) for path, data in files]
        headers = [_header_from_ds(ds, path) for ds, (path, _) in zip(datasets, files, strict=True)]
        _check_consistent(headers, source)
        geo = slice_geometry(headers, max_gap_factor, source)
        first = headers[geo.order[0]]
        shape = (len(headers), first["rows"], first["columns"])  # [slice, row, col]
        volume = np.empty(shape, dtype=np.float32)
        for k, i in enumerate(geo.order):
            _slice_hu(datasets[i], headers[i], volume[k])
    step = geo.step
    if not geo.uniform:
        volume, step = _to_uniform(volume, np.asarray(geo.positions))
    volume = volume.transpose(2, 1, 0)  # [col, row, slice]: a view, no copy
    iop = np.asarray(first["orientation"])
    row_spacing, col_spacing = first["pixel_spacing"]
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = geo.direction * step
    lps[:3, 3] = geo.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    check_grid(volume, affine, source)
    facts = {k: first[k] for k in ("modality", "slice_thickness", "kvp", "manufacturer", "kernel")}
    meta = grid_meta(volume, affine, source_format="dicom", **facts)
    meta.update(
        spacing=(float(col_spacing), float(row_spacing), geo.step),
        shape=(first["columns"], first["rows"], len(headers)),
        n_slices=len(headers),
        max_gap_ratio=geo.max_gap_ratio,
        uniform_spacing=geo.uniform,
        rescale_slope=first["rescale_slope"],
        rescale_intercept=first["rescale_intercept"],
    )
    keys = {k: first[k] for k in ("patient_key", "series_key", "study_key", "description")}
    instances = tuple(headers[i]["instance_key"] or "" for i in geo.order)
    return RawScan(volume, affine, meta, **keys, acquired=series_time(headers), instance_keys=instances)
