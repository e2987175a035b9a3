"""File-format and geometry fixtures for tests: world-space phantoms with markers, NIfTI bytes, DICOM series.

Reusable by any test: nothing here reads real data or touches the network. Head volumes come from the
project's one generator, `fmct_ray.synthetic.synthetic_head(rng, shape, spacing)`; this file turns HU
arrays indexed like `RawScan.array` ([x, y, z] voxel grid of an affine) into files: DICOM series are
built in memory with pydicom (`dicom_series`) or written to a folder (`write_dicom_series`), with file
names that are not in slice order so that readers must sort by position. `head_phantom` is a geometry
fixture (asymmetric markers at known world positions), not a head generator.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

AIR, BRAIN = -1000.0, 30.0

# Distinct, asymmetric markers (RAS mm offsets from the head centre, HU): a mirrored or swapped axis
# moves a marker to where another one (or none) is expected.
MARKERS: tuple[tuple[tuple[float, float, float], float], ...] = (
    ((16.0, 4.0, 6.0), 2400.0),  # right
    ((-5.0, 22.0, -3.0), 1800.0),  # anterior
    ((3.0, -9.0, 20.0), 3000.0),  # superior
)
MARKER_RADIUS_MM = 3.5


def head_phantom(
    points: np.ndarray,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    radii: Sequence[float] = (30.0, 38.0, 34.0),
    markers=MARKERS,
    skull: float = 400.0,
) -> np.ndarray:
    """HU at world points (..., 3) RAS mm: air, a 5 mm skull shell, brain, and spherical markers."""
    rel = np.asarray(points, dtype=np.float32) - np.asarray(center, dtype=np.float32)
    r2 = ((rel / np.asarray(radii, dtype=np.float32)) ** 2).sum(axis=-1)
    inner = (1 - 5.0 / min(radii)) ** 2
    out = np.where(r2 <= 1, np.where(r2 <= inner, BRAIN, skull), AIR).astype(np.float32)
    for offset, value in markers:
        d2 = ((rel - np.asarray(offset, dtype=np.float32)) ** 2).sum(axis=-1)
        out[d2 <= MARKER_RADIUS_MM**2] = value
    return out


def grid_affine(matrix: np.ndarray, shape: Sequence[int], center: Sequence[float]) -> np.ndarray:
    """4x4 affine with 3x3 `matrix` (columns: world step per voxel axis) whose grid centre is `center`."""
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = np.asarray(center) - matrix @ ((np.asarray(shape) - 1) / 2)
    return affine


def sample_world(
    fn: Callable[[np.ndarray], np.ndarray], affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Evaluate a world-space phantom at the voxel centres of (affine, shape)."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    a = affine.astype(np.float32)
    world = np.stack([a[c, 0] * i + a[c, 1] * j + a[c, 2] * k + a[c, 3] for c in range(3)], axis=-1)
    return fn(world)


def nifti_bytes(
    array: np.ndarray,
    affine: np.ndarray,
    gz: bool = True,
    dtype=None,
    slope: float | None = None,
    inter: float | None = None,
) -> bytes:
    """Bytes of a single-file NIfTI-1 (gzipped unless gz=False); optional stored dtype and scaling."""
    data = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, inter if inter is not None else 0.0)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def patch_nifti_header(data: bytes, **fields) -> bytes:
    """Uncompressed NIfTI-1 bytes with raw header fields replaced (nibabel refuses to write broken ones).

    Example: `patch_nifti_header(raw, pixdim=[1, 1, 0, 2, 1, 1, 1, 1], qform_code=0)`.
    """
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(data))
    for key, value in fields.items():
        header[key] = value
    return header.binaryblock + data[header.sizeof_hdr :]


def stored_from_hu(array_hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """HU -> unsigned 16-bit stored values (what a scanner writes before RescaleSlope/Intercept)."""
    return np.clip(np.rint((np.asarray(array_hu) - intercept) / slope), 0, 65535).astype(np.uint16)


def dicom_series(
    array_hu: np.ndarray,
    spacing: Sequence[float] = (0.5, 0.5, 1.5),
    *,
    positions: Sequence[float] | None = None,
    origin: Sequence[float] = (-60.0, -80.0, 100.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    shift_per_slice: Sequence[float] = (0, 0, 0),
    patient_id: str = "SYN-PATIENT-0001",
    patient_name: str = "Synthetic^Patient",
    birth_date: str = "19700101",
    series_uid: str | None = None,
    modality: str = "CT",
    kvp: float | None = 120.0,
    slice_thickness: float | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    manufacturer: str = "SYNTH",
    seed: int = 0,
) -> list[tuple[str, bytes]]:
    """One DICOM CT series in memory: [(file name, bytes)], names in random (not slice) order.

    Args:
        array_hu: HU indexed [column, row, slice] like `RawScan.array`.
        spacing: (column spacing, row spacing, slice step) in mm; PixelSpacing = (row, column) spacing.
        positions: slice positions along the normal (mm, relative to `origin`); default k * step.
        origin: LPS ImagePositionPatient of slice 0.
        orientation: ImageOrientationPatient (row cosine, column cosine).
        shift_per_slice: extra LPS shift per mm along the normal (gantry tilt).
        rescale: (RescaleSlope, RescaleIntercept).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    n = array_hu.shape[2]
    positions = np.arange(n) * spacing[2] if positions is None else np.asarray(positions, dtype=np.float64)
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    series_uid = series_uid or generate_uid(entropy_srcs=[patient_id, str(seed)])
    stored = stored_from_hu(array_hu, *rescale)
    out = []
    for k in range(n):
        ipp = np.asarray(origin) + positions[k] * (normal + np.asarray(shift_per_slice))
        uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, birth_date
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[series_uid, "study"])
        ds.SeriesInstanceUID = series_uid
        ds.Modality, ds.Manufacturer = modality, manufacturer
        if kvp is not None:
            ds.KVP = kvp
        ds.SliceThickness = slice_thickness if slice_thickness is not None else spacing[2]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.Rows, ds.Columns = array_hu.shape[1], array_hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append((f"IM{rng.integers(1 << 40):012x}.dcm", buf.getvalue()))
    return out


def write_dicom_series(
    folder: str | Path,
    array_hu: np.ndarray,
    spacing: Sequence[float] = (0.5, 0.5, 1.5),
    patient_id: str = "SYN-PATIENT-0001",
    series_uid: str | None = None,
    **kwargs,
) -> list[Path]:
    """Write `dicom_series(...)` into `folder` (created); returns the file paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in dicom_series(array_hu, spacing, patient_id=patient_id, series_uid=series_uid, **kwargs):
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths
