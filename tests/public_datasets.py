"""Small datasets in the published layouts of RSNA 2019 and CQ500, written from synthetic heads
(`fmct_ray.synthetic`) and, for RSNA, the real series in ../shared/data/real/. Nothing is downloaded.

RSNA 2019 Intracranial Hemorrhage Detection (stage 2 train), as published:
    stage_2_train/ID_<hex>.dcm      one flat folder of single-slice files named by SOPInstanceUID;
                                    SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID and
                                    PatientID are all ID_<hex>; WindowCenter / WindowWidth are
                                    multi-valued in many files; some slices are 12-bit
                                    two's-complement pixels flagged unsigned with intercept 0
    stage_2_train.csv               ID,Label: six rows per slice, ID_<hex>_<subtype>
CQ500, as published (the patients' folders unzipped under images/):
    images/CQ500CT<n> CQ500CT<n>/Unknown Study/CT <description>/CT<6 digits>.dcm
                                    one folder per patient, several series per study (thin and
                                    thick soft-tissue reconstructions, a bone kernel)
    reads.csv                       name (CQ500-CT-<n>), Category, R1:ICH ... R3:MidlineShift
"""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from synthetic import dicom_series

from fmct_ray.synthetic import draw_anatomy, draw_findings, synthetic_head

RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
CQ500_FINDINGS = (
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
    "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift",
)  # fmt: skip
PIXELS, PIXEL_MM = 128, 1.7  # 218 mm field of view


def head(seed: int, slices: int, step_mm: float, hemorrhage: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU [column, row, slice] of a synthetic head, and which slices its lesions touch."""
    rng = np.random.default_rng(seed)
    anatomy = draw_anatomy(rng)
    findings = draw_findings(rng, anatomy, hemorrhage, hydrocephalus=False)
    shape, spacing = (PIXELS, PIXELS, slices), (PIXEL_MM, PIXEL_MM, step_mm)
    hu = synthetic_head(copy.deepcopy(rng), shape, spacing, anatomy, findings)
    clean = synthetic_head(rng, shape, spacing, anatomy, dataclasses.replace(findings, lesions=()))
    return hu, (hu != clean).any(axis=(0, 1))


def _edit(data: bytes, **fields):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in fields.items():
        setattr(ds, key, value)
    return ds


def _save(ds, path: Path) -> None:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def rsna_id(rng: np.random.Generator) -> str:
    """RSNA's ids: ID_ and hex digits (not valid DICOM UIDs; pydicom warns, readers accept them)."""
    return f"ID_{rng.integers(1 << 36):09x}"


def write_rsna(root: Path, n_series: int = 6, seed: int = 0, real: Path | None = None) -> pd.DataFrame:
    """An RSNA 2019 stage-2-train folder under `root`; returns one row per series: series (the
    SeriesInstanceUID), slices, `broken` (the reason ingest must quarantine it, or ""), and the
    true IPH and Any labels (a slice is positive where a lesion touches it).

    Series 1 stores its pixels with the 12-bit header quirk, series 2 has one slice written twice
    (a second SOP instance at the same position) and series 3 one slice of another size;
    `real` (the InVesalius DICOM folder) adds the real series as one more, negative, series."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)
        return _write_rsna(root, n_series, seed, real)


def _write_rsna(root: Path, n_series: int, seed: int, real: Path | None) -> pd.DataFrame:
    rng = np.random.default_rng([seed, 2019])
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    rows, labels = [], []
    for i in range(n_series):
        hemorrhage = i % 2 == 0
        hu, touched = head(seed * 1000 + i, slices=36, step_mm=5.0, hemorrhage=hemorrhage)
        patient, study, series = rsna_id(rng), rsna_id(rng), rsna_id(rng)
        broken = {2: "duplicate slice positions", 3: "mixed slice sizes"}.get(i, "")
        files = dicom_series(np.clip(hu, -1000, 3000), (PIXEL_MM, PIXEL_MM, 5.0), patient_id=patient, seed=i)
        for (_, data), k in zip(files, _slice_order(files), strict=True):
            for _ in range(2 if i == 2 and k == 10 else 1):  # series 2: slice 10 written twice
                sop = rsna_id(rng)
                ds = _edit(data, SOPInstanceUID=sop, SeriesInstanceUID=series, StudyInstanceUID=study)
                ds.WindowCenter, ds.WindowWidth = ["00036", "00036"], ["00080", "00080"]  # multi-valued
                if i == 1:
                    _twelve_bit(ds)
                if i == 3 and k == 20:  # series 3: one slice of half the size
                    ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
                    ds.Rows, ds.Columns = PIXELS // 2, PIXELS // 2
                _save(ds, images / f"{sop}.dcm")
                positive = bool(touched[k])
                labels += [
                    (sop, t, int(positive and t in ("intraparenchymal", "any"))) for t in RSNA_SUBTYPES
                ]
        truth = bool(touched.any())
        rows.append(
            {
                "series": series,
                "patient": patient,
                "slices": len(files),
                "broken": broken,
                "IPH": truth,
                "Any": truth,
            }
        )
    if real is not None:
        series, study, patient = rsna_id(rng), rsna_id(rng), rsna_id(rng)
        files = sorted(real.glob("*.dcm"))
        for path in files:
            sop = rsna_id(rng)
            ds = _edit(path.read_bytes(), SOPInstanceUID=sop, SeriesInstanceUID=series)
            ds.StudyInstanceUID, ds.PatientID = study, patient
            _save(ds, images / f"{sop}.dcm")
            labels += [(sop, t, 0) for t in RSNA_SUBTYPES]
        rows.append(
            {
                "series": series,
                "patient": patient,
                "slices": len(files),
                "broken": "",
                "IPH": False,
                "Any": False,
            }
        )
    table = pd.DataFrame([(f"{sop}_{t}", v) for sop, t, v in labels], columns=["ID", "Label"])
    table.to_csv(root / "stage_2_train.csv", index=False)
    return pd.DataFrame(rows)


def _slice_order(files: list[tuple[str, bytes]]) -> list[int]:
    """The slice index of each file (`dicom_series` names files in random order)."""
    import pydicom

    return [int(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).InstanceNumber) - 1 for _, d in files]


def _twelve_bit(ds) -> None:
    """Re-encode a slice as RSNA's quirky ones are: HU as 12-bit two's complement, flagged unsigned,
    intercept 0 (air reads about 3096)."""
    hu = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.PixelData = (np.rint(hu).astype(np.int32) % 4096).astype(np.uint16).tobytes()
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, 0


CQ500_SERIES = (  # (description, kernel, slice step mm): a thin and a thick plain series, a bone one
    ("PLAIN THIN", "STANDARD", 2.5),
    ("5mm", "STANDARD", 5.0),
    ("BONE", "BONE", 5.0),
)


def write_cq500(root: Path, n_patients: int = 6, seed: int = 0) -> pd.DataFrame:
    """A CQ500 tree and reads.csv under `root`; returns one row per patient: name, the truth
    (ICH, IPH) and the description of the series that should be its study's primary."""
    reads, truth = [], []
    for n in range(n_patients):
        hemorrhage = n % 2 == 0
        name = f"CQ500-CT-{n}"
        study = f"1.2.826.0.1.3680043.9.{seed}.{n}"
        for s, (description, kernel, step) in enumerate(CQ500_SERIES):
            slices = int(round(180 / step))
            hu, _ = head(seed * 1000 + n, slices=slices, step_mm=step, hemorrhage=hemorrhage)
            folder = root / "images" / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study" / f"CT {description}"
            folder.mkdir(parents=True)
            files = dicom_series(hu, (PIXEL_MM, PIXEL_MM, step), patient_id=name, seed=100 * n + s)
            for (_, data), k in zip(files, _slice_order(files), strict=True):
                ds = _edit(data, StudyInstanceUID=study, SeriesDescription=f"CT {description}")
                ds.ConvolutionKernel = kernel
                _save(ds, folder / f"CT{k:06d}.dcm")
        row = {"name": name, "Category": "B1" if n % 3 else "B2"}
        for r in ("R1", "R2", "R3"):
            wrong = r == "R3" and n == 0  # one reader disagrees: the majority still holds
            row |= {f"{r}:{f}": int(hemorrhage != wrong and f in ("ICH", "IPH")) for f in CQ500_FINDINGS}
        reads.append(row)
        truth.append({"name": name, "ICH": hemorrhage, "IPH": hemorrhage, "primary": "CT PLAIN THIN"})
    reads.append({"name": "CQ500-CT-999", "Category": "B1", **{f"R1:{f}": 0 for f in CQ500_FINDINGS}})
    pd.DataFrame(reads).fillna(0).astype({c: int for c in reads[0] if ":" in c}).to_csv(
        root / "reads.csv", index=False
    )
    return pd.DataFrame(truth)
