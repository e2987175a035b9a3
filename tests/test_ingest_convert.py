"""Readers, quality gates and conversion: synthetic NIfTI/DICOM, corrupt inputs, and the real scans."""

from __future__ import annotations

import gzip
import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from synthetic import dicom_series, nifti_bytes, patch_nifti_header

from fmct_ray.config import load
from fmct_ray.ingest.geometry import PreprocessConfig, convert
from fmct_ray.ingest.pipeline import IngestConfig
from fmct_ray.ingest.privacy import date_shift_days, pseudonym, shift_time
from fmct_ray.ingest.quality import QualityConfig, check_header, check_intensities
from fmct_ray.ingest.readers import (
    QuarantineError,
    RawScan,
    read_dicom_header,
    read_dicom_series,
    read_nifti,
    slice_geometry,
)
from fmct_ray.ingest.scan_time import dicom_datetime
from fmct_ray.synthetic import synthetic_head

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
DICOM_DIR = REAL / "invesalius_0051_dicom"
TEMPLATE = REAL / "ichseg_template_1mm_hu_skullstripped.nii.gz"
needs_real = pytest.mark.skipif(
    not DICOM_DIR.is_dir(), reason=f"real data missing: {REAL} (see shared/data/real)"
)
IDENTITY = ("SYN-PATIENT-0001", "Synthetic^Patient", "19700101")
AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


@pytest.fixture(scope="module")
def head() -> np.ndarray:
    return synthetic_head(np.random.default_rng(0), (48, 48, 24), (1.0, 1.0, 2.0))


def ramp_volume(shape=(24, 20, 12)) -> np.ndarray:
    """Slice k holds 10*k + column index: any slice misorder or transpose shows."""
    cols = np.arange(shape[0], dtype=np.float32)[:, None, None]
    return np.broadcast_to(cols + 10.0 * np.arange(shape[2])[None, None, :], shape).astype(np.float32) - 500


# -- NIfTI --------------------------------------------------------------------------------------------
def test_nifti_roundtrip_with_scaling(head):
    stored = np.rint((head + 1024) / 2)
    raw = read_nifti(nifti_bytes(stored, AFFINE, dtype=np.int16, slope=2.0, inter=-1024.0), "a.nii.gz")
    assert raw.array.dtype == np.float32
    np.testing.assert_allclose(raw.array, stored * 2 - 1024)
    np.testing.assert_allclose(raw.affine, AFFINE)
    assert raw.meta["orientation"] == "RAS" and raw.meta["shape"] == head.shape and raw.meta["n_slices"] == 24
    assert raw.meta["spacing"] == pytest.approx((0.8, 0.8, 2.0)) and raw.meta["modality"] is None
    assert read_nifti(nifti_bytes(head, AFFINE, gz=False), "a.nii").array.shape == head.shape


def test_nifti_slice_count_follows_the_axis_closest_to_s(head):
    lps_sagittal = np.array([[0, 0, -2.0, 0], [0, -0.8, 0, 0], [0.8, 0, 0, 0], [0, 0, 0, 1]])
    raw = read_nifti(nifti_bytes(head, lps_sagittal), "s.nii.gz")
    assert raw.meta["orientation"] == "SPL" and raw.meta["n_slices"] == head.shape[0]


def zero_spacing_nifti(head: np.ndarray, pixdim: bool) -> bytes:
    raw = nifti_bytes(head, AFFINE, gz=False)
    if pixdim:
        return patch_nifti_header(raw, pixdim=[1.0, 0.8, 0.0, 2.0, 1, 1, 1, 1])
    return patch_nifti_header(raw, srow_y=[0.0, 0.0, 0.0, 0.0], qform_code=0)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("empty", lambda h: b"", "empty file"),
        ("truncated gzip", lambda h: nifti_bytes(h, AFFINE)[:3000], "gzip"),
        ("truncated data", lambda h: nifti_bytes(h, AFFINE, gz=False)[:5000], "image data"),
        ("text", lambda h: b"patient list\n" * 200, "not a NIfTI"),
        ("2D", lambda h: nifti_bytes(h[:, :, 0], AFFINE), "2D image"),
        ("single slice", lambda h: nifti_bytes(h[:, :, :1], AFFINE), "2D image"),
        ("4D", lambda h: nifti_bytes(np.stack([h, h], -1), AFFINE), "4D image"),
        ("NaN", lambda h: nifti_bytes(np.where(h > 500, np.nan, h).astype(np.float32), AFFINE), "NaN"),
        ("inf", lambda h: nifti_bytes(np.where(h > 500, np.inf, h).astype(np.float32), AFFINE), "inf"),
        ("zero spacing", lambda h: zero_spacing_nifti(h, pixdim=True), "zero or negative voxel size"),
        ("zero sform spacing", lambda h: zero_spacing_nifti(h, pixdim=False), "zero voxel spacing"),
    ],
)
def test_corrupt_nifti_is_quarantined(head, name, make, reason):
    with pytest.raises(QuarantineError, match=reason) as info:
        read_nifti(make(head), f"site/{name}.nii.gz")
    assert f"site/{name}.nii.gz" in str(info.value) and info.value.reason


def test_nifti_without_orientation_is_quarantined(head):
    raw = patch_nifti_header(nifti_bytes(head, AFFINE, gz=False), qform_code=0, sform_code=0)
    with pytest.raises(QuarantineError, match="orientation unknown"):
        read_nifti(raw, "x.nii")


def test_negative_pixdim_is_quarantined(head):
    raw = patch_nifti_header(nifti_bytes(head, AFFINE, gz=False), pixdim=[1.0, 0.8, -0.8, 2.0, 1, 1, 1, 1])
    with pytest.raises(QuarantineError, match="negative voxel size"):
        read_nifti(raw, "x.nii")


# -- DICOM --------------------------------------------------------------------------------------------
def test_dicom_series_sorted_by_position_not_name():
    vol = ramp_volume()
    files = dicom_series(vol, (0.5, 0.6, 1.5), origin=(10.0, 20.0, -30.0))
    assert [n for n, _ in files] != sorted(n for n, _ in files), "names must not be in slice order"
    raw = read_dicom_series(sorted(files))
    np.testing.assert_allclose(raw.array, vol)
    # LPS (10, 20, -30) -> RAS (-10, -20, -30); columns run to patient left, rows to posterior.
    np.testing.assert_allclose(raw.affine[:3, 3], [-10, -20, -30], atol=1e-3)
    np.testing.assert_allclose(raw.affine[:3, :3], np.diag([-0.5, -0.6, 1.5]), atol=1e-6)
    assert raw.meta["orientation"] == "LPS" and raw.meta["n_slices"] == 12 and raw.meta["uniform_spacing"]
    assert (raw.meta["modality"], raw.meta["kvp"], raw.meta["slice_thickness"]) == ("CT", 120.0, 1.5)
    assert raw.patient_key == IDENTITY[0] and raw.series_key
    assert not any(s in repr(raw.meta) for s in IDENTITY + (raw.series_key,)), "identity leaked into meta"


def test_dicom_descending_positions_and_rescale():
    vol = ramp_volume()
    files = dicom_series(vol, (0.5, 0.5, 2.0), positions=-2.0 * np.arange(12), rescale=(0.5, -1000.0))
    raw = read_dicom_series(files)
    np.testing.assert_allclose(raw.array, vol[:, :, ::-1], atol=0.5)  # stored on a 0.5 HU step
    assert raw.affine[2, 2] == pytest.approx(2.0) and raw.affine[2, 3] == pytest.approx(100.0 - 22.0)


def test_dicom_nonuniform_spacing_resampled_exactly_for_linear_content():
    z = np.r_[np.arange(10) * 1.5, 13.5 + 1.0, 15.5]  # one 1.0 mm step among 1.5 mm steps
    vol = np.zeros((16, 16, len(z)), np.float32) + (4.0 * z - 200)[None, None, :]
    raw = read_dicom_series(dicom_series(vol, (1.0, 1.0, 1.5), positions=z))
    assert not raw.meta["uniform_spacing"] and raw.meta["max_gap_ratio"] == pytest.approx(1.0)
    world_z = raw.affine[2, 2] * np.arange(raw.array.shape[2]) + raw.affine[2, 3]
    assert world_z[0] == pytest.approx(100.0) and world_z[-1] == pytest.approx(115.5)
    np.testing.assert_allclose(raw.array[3, 3, :], 4.0 * (world_z - 100.0) - 200, atol=1e-3)


def test_dicom_gantry_tilt_kept_in_affine():
    vol = ramp_volume()
    raw = read_dicom_series(dicom_series(vol, (0.5, 0.5, 1.0), shift_per_slice=(0, 0.2, 0)))
    np.testing.assert_allclose(raw.affine[:3, 2], [0, -0.2, 1.0], atol=1e-4)  # LPS +y -> RAS -y


def test_dicom_oblique_series_geometry():
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    iop = (1, 0, 0, 0, c, -s)  # rows tilted 20 degrees about x
    raw = read_dicom_series(dicom_series(ramp_volume(), (0.5, 0.5, 1.0), orientation=iop))
    normal = np.cross([1, 0, 0], [0, c, -s])
    np.testing.assert_allclose(raw.affine[:3, 2], normal * [-1, -1, 1], atol=1e-4)


def test_dicom_header_only():
    name, data = dicom_series(ramp_volume())[0]
    header = read_dicom_header(data, name)
    assert header["patient_key"] == IDENTITY[0] and header["series_key"] and header["modality"] == "CT"
    assert len(header["position"]) == 3 and header["rows"] == 20 and header["columns"] == 24


def drop(files, k):
    return [
        f
        for i, f in enumerate(sorted(files, key=lambda f: read_dicom_header(f[1], f[0])["position"][2]))
        if i != k
    ]


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("missing slice", lambda f: drop(f, 5), "missing slice"),
        ("duplicate", lambda f: f + [("copy.dcm", f[3][1])], "duplicate slice positions"),
        ("one slice", lambda f: f[:1], "2D image"),
        (
            "mixed orientation",
            lambda f: (
                f[:6] + dicom_series(ramp_volume(), orientation=(0, 1, 0, 0, 0, -1), series_uid="1.2.3.4")[6:]
            ),
            "orientation",
        ),
        (
            "mixed size",
            lambda f: f[:6] + dicom_series(ramp_volume((20, 20, 12)), series_uid="1.2.3.4")[6:],
            "sizes",
        ),
        (
            "two series",
            lambda f: f[:6] + dicom_series(ramp_volume(), series_uid="9.9.9")[6:],
            "more than one series",
        ),
        ("truncated file", lambda f: f[:5] + [(f[5][0], f[5][1][:-400])] + f[6:], "pixel data"),
        ("text file", lambda f: f[:5] + [("notes.dcm", b"not dicom at all" * 100)] + f[6:], "DICOM"),
        ("empty file", lambda f: f[:5] + [("empty.dcm", b"")] + f[6:], "empty file"),
    ],
)
def test_corrupt_dicom_series_is_quarantined(name, make, reason):
    files = dicom_series(ramp_volume(), series_uid="1.2.3.4")
    with pytest.raises(QuarantineError, match=reason) as info:
        read_dicom_series(make(files))
    assert not any(s in str(info.value) for s in IDENTITY + ("1.2.3.4", "9.9.9")), "identity in message"


def test_dicom_gap_factor_is_configurable():
    files = drop(dicom_series(ramp_volume(), series_uid="1.2.3.4"), 5)
    raw = read_dicom_series(files, max_gap_factor=2.5)
    assert raw.meta["max_gap_ratio"] == pytest.approx(2.0)
    with pytest.raises(QuarantineError, match="missing slice"):
        check_header(raw.meta, QualityConfig())
    check_header(raw.meta, QualityConfig(max_gap_factor=2.5))


# -- quality gates ------------------------------------------------------------------------------------
META = {"modality": "CT", "n_slices": 40, "slice_thickness": 2.0, "kvp": 120.0, "spacing": (0.5, 0.5, 2.0)}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "MR"}, "modality 'MR'"),
        ({"n_slices": 5}, "5 slices"),
        ({"slice_thickness": 7.0}, "slice thickness 7"),
        ({"slice_thickness": 0.3}, "slice thickness 0.3"),
        ({"kvp": 200.0}, "kVp 200"),
        ({"kvp": 50.0}, "kVp 50"),
        ({"max_gap_ratio": 3.0}, "missing slice"),
        ({"spacing": (0.5, 0.0, 2.0)}, "zero or negative spacing"),
    ],
)
def test_header_gates(change, reason):
    check_header(META)
    check_header({**META, "modality": None, "slice_thickness": None, "kvp": None})  # unknown passes
    with pytest.raises(QuarantineError, match=reason):
        check_header({**META, **change})


def test_header_gates_configurable():
    check_header(
        {**META, "modality": "MR", "kvp": 200.0}, QualityConfig(modalities=("CT", "MR"), kvp=(70, 250))
    )
    cfg = load(QualityConfig, overrides=["require_air=false", "slice_thickness_mm=[0.5, 10]"])
    assert not cfg.require_air and cfg.slice_thickness_mm == (0.5, 10.0)


def test_non_ct_dicom_fails_header_gate():
    raw = read_dicom_series(dicom_series(ramp_volume(), modality="MR", kvp=None))
    with pytest.raises(QuarantineError, match="modality"):
        check_header(raw.meta)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("display 0-255", lambda h: np.clip((h + 160) / 400 * 255, 0, 255), "8-bit display image"),
        ("background zeroed", lambda h: np.where(h < -500, 0.0, h), "background set to 0"),
        ("no rescale", lambda h: h + 1024, "no negative values"),
        ("wrong slope", lambda h: h * 0.5, "voxels are air"),
        ("constant", lambda h: np.zeros_like(h) - 1000, "constant image"),
        ("NaN", lambda h: np.where(h > 500, np.nan, h), "NaN"),
    ],
)
def test_intensity_gates(head, name, make, reason):
    check_intensities(head)
    with pytest.raises(QuarantineError, match=reason):
        check_intensities(make(head).astype(np.float32))


def test_require_air_switch(head):
    zeroed = np.where(head < -500, 0.0, head).astype(np.float32)
    check_intensities(zeroed, QualityConfig(require_air=False))
    with pytest.raises(QuarantineError, match="display"):  # the display-image gate always applies
        check_intensities(np.clip(head, 0, 255), QualityConfig(require_air=False))


def test_synthetic_nifti_end_to_end(head):
    raw = read_nifti(nifti_bytes(head, AFFINE), "h.nii.gz")
    check_header(raw.meta)
    check_intensities(raw.array)
    volume, affine = convert(raw, PreprocessConfig(size=(64, 64, 64)))
    assert volume.shape == (64, 64, 64) and volume.dtype == np.int16
    assert (volume > -500).sum() == pytest.approx((head > -500).sum() * 0.8 * 0.8 * 2.0, rel=0.1)


def test_gzip_helper_is_real_gzip(head):
    assert gzip.decompress(nifti_bytes(head, AFFINE))[344:348] == b"n+1\0"


# -- real data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_files():
    if not DICOM_DIR.is_dir():
        pytest.skip(f"real data missing: {DICOM_DIR}")
    return [(str(p), p.read_bytes()) for p in sorted(DICOM_DIR.glob("*.dcm"))]


@pytest.fixture(scope="module")
def reference():
    return json.loads((REAL / "invesalius_0051_reference.json").read_text())


@pytest.fixture(scope="module")
def real_raw(real_files):
    return read_dicom_series(real_files)


@needs_real
def test_real_series_header_and_sorting(real_files, reference):
    headers = [read_dicom_header(data, path) for path, data in real_files]
    assert (
        len(headers) == reference["n_files"]
        and len({h["series_key"] for h in headers}) == reference["n_series"]
    )
    geo = slice_geometry(headers)
    np.testing.assert_allclose(geo.positions, reference["z_positions_sorted"], atol=1e-4)
    assert sorted(np.round(np.diff(geo.positions), 4)) == pytest.approx(
        sorted(np.round(np.diff(reference["z_positions_sorted"]), 4))
    )
    assert [headers[i]["instance_number"] for i in geo.order] == reference["instance_numbers_sorted_by_z"]
    assert not geo.uniform and geo.step == pytest.approx(1.5)


@needs_real
def test_real_series_raw_volume(real_raw, real_files, reference):
    meta = real_raw.meta
    assert meta["shape"] == (*reference["rows_cols"], reference["n_files"]) and meta["n_slices"] == 108
    assert meta["spacing"] == pytest.approx((*reference["pixel_spacing_mm"], 1.5), abs=1e-6)
    assert (meta["rescale_slope"], meta["rescale_intercept"]) == tuple(reference["rescale"])
    assert meta["slice_thickness"] == reference["slice_thickness_mm"] and meta["kvp"] == 140.0
    assert meta["orientation"] == "LPS" and meta["modality"] == "CT"
    x0, y0 = reference["image_position_first_xy"]
    z = reference["z_positions_sorted"]
    np.testing.assert_allclose(real_raw.affine[:3, 3], [-x0, -y0, z[0]], atol=1e-4)  # LPS -> RAS
    last = real_raw.affine @ [0, 0, real_raw.array.shape[2] - 1, 1]
    assert last[2] == pytest.approx(z[-1])  # the uniform grid spans the first to the last slice exactly
    # The first slice is not interpolated: it must equal pixel * slope + intercept of the lowest file.
    import pydicom

    lowest = min(
        real_files,
        key=lambda f: float(pydicom.dcmread(f[0], stop_before_pixels=True).ImagePositionPatient[2]),
    )
    ds = pydicom.dcmread(lowest[0])
    identity = [str(ds.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID")]
    assert not any(v in repr(meta) for v in identity + [real_raw.series_key]), "identity field in meta"
    assert real_raw.patient_key == str(ds.PatientID)
    np.testing.assert_array_equal(real_raw.array[:, :, 0], ds.pixel_array.T.astype(np.float32) - 1024)
    assert real_raw.array.min() == reference["hu_min"]
    assert abs(real_raw.array.max() - reference["hu_max"]) < 100  # interpolated grid, near the reference
    sample = real_raw.array[::2, ::2, :]
    assert np.median(sample) == pytest.approx(reference["hu_median"], abs=3)
    assert np.mean(sample < -900) == pytest.approx(reference["frac_lt_-900"], abs=0.01)
    check_header(meta)
    check_intensities(real_raw.array)


@needs_real
def test_real_series_converts_to_224_ras(real_raw):
    start = time.perf_counter()
    volume, affine = convert(real_raw, PreprocessConfig())
    seconds = time.perf_counter() - start
    print(f"real series conversion: {seconds:.2f} s")
    assert volume.shape == (224, 224, 224) and volume.dtype == np.int16 and volume.flags["C_CONTIGUOUS"]
    assert "".join(nib.aff2axcodes(affine)) == "RAS" and np.allclose(affine[:3, :3], np.eye(3))
    assert volume.min() == -1024 and volume.max() <= 3071
    # Whole scan extent along S (160 mm) fits in the box: nothing cut.
    top = np.linalg.inv(affine) @ [0, 0, 276.0, 1]
    bottom = np.linalg.inv(affine) @ [0, 0, 116.0, 1]
    assert bottom[2] >= 0 and top[2] <= 223
    # Central brain (slice 81 of the series, z = 237.5 mm, image centre x = 0, y_LPS = -45): 20-45 HU.
    i, j, k = np.rint(np.linalg.inv(affine) @ [0.0, 45.0, 237.5, 1])[:3].astype(int)
    roi = volume[i - 10 : i + 11, j - 10 : j + 11, k - 2 : k + 3]
    assert 20 <= np.median(roi) <= 45
    assert np.median(volume[:8, :8, :]) == -1024  # air, set to the constant
    # Head (largest component) kept whole along R and S: it does not touch those faces of the box.
    from scipy import ndimage as ndi

    labels, _ = ndi.label(volume > -500)
    head = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    for axis in (0, 2):
        profile = head.any(axis=tuple(a for a in range(3) if a != axis))
        assert not profile[0] and not profile[-1], f"head touches the box along axis {axis}"


@needs_real
def test_real_series_geometry_voxel_for_voxel(real_raw):
    """Nearest-neighbour conversion: every output voxel holds the input voxel at the same world point."""
    cfg = PreprocessConfig(interpolation="nearest", air_to_constant=False)
    volume, affine = convert(real_raw, cfg)
    rng = np.random.default_rng(0)
    out_idx = rng.integers(0, 224, size=(2000, 3))
    in_idx = np.rint(
        (np.linalg.inv(real_raw.affine) @ affine @ np.c_[out_idx, np.ones(2000)].T)[:3].T
    ).astype(int)
    inside = np.all((in_idx >= 0) & (in_idx < real_raw.array.shape), axis=1)
    assert inside.sum() > 500
    expected = np.clip(np.rint(real_raw.array[tuple(in_idx[inside].T)]), -1024, 3071)
    got = volume[tuple(out_idx[inside].T)]
    assert np.mean(got == expected) > 0.99  # ties at exact half-voxel positions may round either way
    assert np.all(volume[tuple(out_idx[~inside].T)] == -1024)


@needs_real
def test_real_template_gates_and_switch():
    if not TEMPLATE.is_file():
        pytest.skip(f"real data missing: {TEMPLATE}")
    raw = read_nifti(TEMPLATE.read_bytes(), str(TEMPLATE))
    assert raw.meta["orientation"] == "RAS" and raw.meta["shape"] == (181, 217, 181)
    check_header(raw.meta)
    with pytest.raises(QuarantineError, match="background set to 0.*skull-stripped"):
        check_intensities(raw.array)
    check_intensities(raw.array, QualityConfig(require_air=False))
    volume, affine = convert(raw, PreprocessConfig())
    assert volume.shape == (224, 224, 224)
    # 1 mm RAS on integer coordinates: conversion is a pure shift, the whole template is kept exactly.
    offset = np.rint(np.linalg.inv(affine) @ raw.affine[:, 3])[:3].astype(int)
    assert np.all(offset >= 0) and np.all(offset + raw.array.shape <= 224)
    box = volume[tuple(slice(o, o + n) for o, n in zip(offset, raw.array.shape, strict=True))]
    np.testing.assert_array_equal(box, np.rint(raw.array).astype(np.int16))


def test_quarantine_error_is_value_error():
    err = QuarantineError("bad thing", "some/path.nii")
    assert (
        isinstance(err, ValueError) and str(err) == "some/path.nii: bad thing" and err.reason == "bad thing"
    )
    assert isinstance(RawScan(np.zeros((2, 2, 2)), np.eye(4)).meta, dict)


# -- scan time and date shifting ------------------------------------------------------------------------
def retag(files: list[tuple[str, bytes]], edit) -> list[tuple[str, bytes]]:
    """The series with `edit(slice_index, dataset)` applied to every file (slice index = InstanceNumber-1)."""
    import io

    import pydicom

    out = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        edit(int(ds.InstanceNumber) - 1, ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((name, buf.getvalue()))
    return out


def dated(k: int, ds, levels=("Acquisition", "Series", "Study")) -> None:
    """Study 08:00, series 08:05, acquisition 08:10 + 2 s per slice, on 2019-03-07; only `levels` kept."""
    times = {"Study": "080000", "Series": "080500", "Acquisition": f"0810{2 * k:02d}.250"}
    for level, tm in times.items():
        if level in levels:
            setattr(ds, f"{level}Date", "20190307")
            setattr(ds, f"{level}Time", tm)


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        (("Acquisition", "Series", "Study"), datetime(2019, 3, 7, 8, 10, 0, 250000)),  # earliest slice
        (("Series", "Study"), datetime(2019, 3, 7, 8, 5)),
        (("Study",), datetime(2019, 3, 7, 8, 0)),
        ((), None),
    ],
)
def test_dicom_scan_time_fallback_order(levels, expected):
    files = retag(dicom_series(ramp_volume()), lambda k, ds: dated(k, ds, levels))
    raw = read_dicom_series(files)
    assert raw.acquired == expected
    assert "2019" not in repr(raw.meta) and "20190307" not in repr(raw.meta), "a date leaked into meta"


def test_dicom_scan_time_partial_and_broken_tags():
    # Acquisition level on some slices only: it still wins, earliest over the slices that have it.
    def some(k, ds):
        dated(k, ds, ("Series",) if k < 4 else ("Acquisition", "Series"))

    assert read_dicom_series(retag(dicom_series(ramp_volume()), some)).acquired == datetime(
        2019, 3, 7, 8, 10, 8, 250000
    )

    # An unreadable AcquisitionDate makes the level absent (-> series); a date without time is midnight.
    def broken(k, ds):
        dated(k, ds)
        with pytest.warns(UserWarning, match="Invalid value for VR DA"):  # pydicom writes it all the same
            ds.AcquisitionDate = "2019-13-45"
        del ds.SeriesTime

    assert read_dicom_series(retag(dicom_series(ramp_volume()), broken)).acquired == datetime(2019, 3, 7)


@pytest.mark.parametrize(
    ("da", "tm", "expected"),
    [
        ("20240110", "083015.5", datetime(2024, 1, 10, 8, 30, 15, 500000)),
        ("20240110", "0830", datetime(2024, 1, 10, 8, 30)),
        ("20240110", "08", datetime(2024, 1, 10, 8)),
        ("2024.01.10", "08:30:15", datetime(2024, 1, 10, 8, 30, 15)),  # ACR-NEMA style
        ("20240110", "", datetime(2024, 1, 10)),
        ("20240110", "250000", datetime(2024, 1, 10)),  # invalid hour: the date alone
        ("20240230", "083015", None),  # 30 February
        ("", "083015", None),
        (None, None, None),
    ],
)
def test_dicom_datetime(da, tm, expected):
    assert dicom_datetime(da, tm) == expected


def test_nifti_has_no_scan_time(head):
    assert read_nifti(nifti_bytes(head, AFFINE), "a.nii.gz").acquired is None


def test_date_shift_deterministic_bounded_and_per_patient():
    patients = [pseudonym(b"k", "patient", f"MRN{i}") for i in range(3000)]
    shifts = np.array([date_shift_days(b"site-secret", p, 365) for p in patients])
    again = np.array([date_shift_days(b"site-secret", p, 365) for p in patients])
    np.testing.assert_array_equal(shifts, again)  # deterministic
    assert np.all(np.abs(shifts) <= 365) and np.all(shifts != 0)  # bounded, never the real date
    # spread over [-365, 365]: about uniform (each quarter ~25%, mean ~0 +- 4 days s.e.)
    quarters = np.histogram(shifts, bins=[-365, -182, 0, 183, 366])[0] / len(shifts)
    assert np.all(np.abs(quarters - 0.25) < 0.04), quarters
    assert abs(shifts.mean()) < 25 and len(np.unique(shifts)) > 600
    # another site's secret gives other shifts (two draws agree with probability 1/730)
    other = np.array([date_shift_days(b"other-secret", p, 365) for p in patients])
    assert np.mean(other == shifts) < 0.01
    assert {date_shift_days(b"s", p, 1) for p in patients[:50]} == {-1, 1}
    assert all(date_shift_days(b"s", p, 0) == 0 for p in patients[:50])  # 0 disables shifting
    t = datetime(2020, 5, 1, 13, 45, 7)
    moved = shift_time(t, b"s", patients[0], 30)
    assert moved - t == timedelta(days=date_shift_days(b"s", patients[0], 30)) and moved.time() == t.time()
    assert shift_time(None, b"s", patients[0], 30) is None
    with pytest.raises(ValueError, match=">= 0"):
        date_shift_days(b"s", patients[0], -1)
    with pytest.raises(ValueError, match="date_shift_days"):
        load(IngestConfig, None, ["date_shift_days=-5"])


@needs_real
def test_real_series_scan_time(real_raw, real_files):
    """The real series' time, checked against pydicom directly: earliest AcquisitionDate/Time."""
    import pydicom

    stamps = []
    for path, _ in real_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stamps.append(datetime.strptime(f"{ds.AcquisitionDate}{ds.AcquisitionTime}", "%Y%m%d%H%M%S.%f"))
    assert real_raw.acquired == min(stamps) and len(set(stamps)) == len(stamps)  # per-slice times differ
    assert real_raw.acquired.year == 2002
