"""Synthetic head CTs with per-scan anatomy and graded findings: the one generator of the project.

A head is an ellipsoid in air (scalp, a bony skull shell, grey and white matter, two lateral CSF
ventricles), posed and scaled per scan, with smooth brain texture and scanner noise. What varies
per scan (`Anatomy`) is what a self-supervised model can learn from views of one scan: head size
and pose, skull density and thickness, ventricle size, tissue contrast, texture, noise level.
Findings (`Findings`) are planted with graded difficulty:

- hydrocephalus: ventricles enlarged 1.5-2.4x (a normal head varies 0.8-1.2x);
- hemorrhage: 1-3 hyperdense blobs in one hemisphere, radius 3-12 mm, 50-85 HU (grey matter is
  about 38 HU), so small low-contrast ones are hard; its side is a label of its own
  (`hemorrhage_left`: positive only for a left-sided bleed, so a side-blind detector fails it);
- midline shift (when asked for: `midline_shift` prevalence): an extra-axial hematoma (55-80 HU)
  over one hemisphere's convexity, 5-17 mm thick, pushing the midline structures (the ventricles)
  3-10 mm to the other side (`midline_shift_mm`, the continuous target behind the label);
- atrophy (when asked for: `atrophy` prevalence; the CT sign behind SPEC's dementia task, ADRD):
  global volume loss of graded severity 0.25-1, the brain pulled away from the inner skull by a
  CSF rim of 2-5 mm, widened cortical sulci (CSF in 12-33% of the outer cortex) and ventricles
  enlarged ex vacuo 1.09-1.35x (`atrophy_severity` is the continuous target).

Targets beyond the labels (issue 12's task categories), from the same draws: continuous values
(`ventricle_ml`, `lesion_ml`, `midline_shift_mm`, `atrophy_severity`), a survival time that
depends on the findings, with censoring (`survival=True`: `draw_survival`), the largest lesion's
centre as a point in the grid's frame (`lesion_{x,y,z}_mm`, `head_to_grid`) and a label volume
(`render_head`, `masks=True`: 1 the lateral ventricles, 2 the hemorrhage; `MASK_CLASSES`).

Coordinates are RAS millimetres (axis 0 points to the patient's right, so the left hemisphere is at
negative x relative to the head's midline). Everything is a function of a numpy Generator.

Uses:
- `synthetic_head` / `synthetic_scan`: one float32 HU volume (any grid shape and spacing: the ingest
  tests use small anisotropic grids);
- `write_store`: a site store written directly in the stored frame (224^3 int16, no ingest), with
  the labels of every scan: the pretraining corpus, the study's labelled pools, tests, benchmarks;
- `write_site` + `ingest_synthetic_sites`: NIfTI files in varied orientations, the real ingest job,
  labels joined by the pseudonymised path (the demo and the end-to-end tests).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

FINDINGS = ("hemorrhage", "hydrocephalus", "hemorrhage_left", "midline_shift", "atrophy")
MASK_CLASSES = ("background", "ventricles", "hemorrhage")  # the label volume's values 0, 1, 2
ROOT = Path(__file__).resolve().parents[1]
AIR = -1000.0
CSF = 6.0


@dataclass(frozen=True)
class Anatomy:
    """What varies between normal heads (all lengths in mm)."""

    radii: tuple[float, float, float] = (68.0, 88.0, 70.0)  # outer scalp surface, R/A/S semi-axes
    yaw_deg: float = 0.0  # rotation about the S axis
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)  # head centre offset
    skull_hu: float = 1200.0
    skull_mm: float = 6.0
    ventricle_scale: float = 1.0
    grey_hu: float = 38.0
    white_hu: float = 27.0
    texture_hu: float = 3.0  # amplitude of smooth brain texture
    noise_hu: float = 6.0  # scanner noise std


@dataclass(frozen=True)
class Lesion:
    centre: tuple[float, float, float]  # head frame (before pose), mm
    radius: float
    hu: float


@dataclass(frozen=True)
class Findings:
    hydrocephalus: float = 0.0  # ventricle enlargement factor on top of the anatomy (0: none)
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)
    shift_mm: float = 0.0  # midline shift away from an extra-axial hematoma (0: none)
    shift_side: float = 1.0  # +1: the hematoma over the right hemisphere (shift to the left)
    hematoma_hu: float = 65.0
    atrophy: float = 0.0  # severity of global volume loss, 0.25-1 (0: none)

    def labels(self) -> dict[str, bool]:
        return {
            "hemorrhage": bool(self.lesions),
            "hydrocephalus": self.hydrocephalus > 0,
            "hemorrhage_left": any(les.centre[0] < 0 for les in self.lesions),
            "midline_shift": self.shift_mm > 0,
            "atrophy": self.atrophy > 0,
        }


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        radii=tuple(float(r) for r in np.array([68.0, 88.0, 70.0]) * rng.uniform(0.9, 1.08, 3)),
        yaw_deg=float(rng.uniform(-10, 10)),
        shift=tuple(float(s) for s in rng.uniform(-6, 6, 3)),
        skull_hu=float(rng.uniform(700, 1600)),
        skull_mm=float(rng.uniform(4, 8)),
        ventricle_scale=float(rng.uniform(0.8, 1.2)),
        grey_hu=float(rng.uniform(34, 42)),
        white_hu=float(rng.uniform(24, 30)),
        texture_hu=float(rng.uniform(1, 5)),
        noise_hu=float(rng.uniform(3, 12)),
    )


def draw_findings(
    rng: np.random.Generator, anatomy: Anatomy, hemorrhage: bool, hydrocephalus: bool
) -> Findings:
    """Graded findings: enlargement 1.5-2.4x; 1-3 lesions in one hemisphere, 3-12 mm, 50-85 HU."""
    lesions: list[Lesion] = []
    if hemorrhage:
        side = rng.choice([-1.0, 1.0])
        radius = float(rng.uniform(3, 12))
        hu = float(rng.uniform(50, 85))
        r = np.asarray(anatomy.radii)
        for _ in range(int(rng.integers(1, 4))):
            # in the parenchyma of one hemisphere, clear of the midline
            centre = rng.uniform([0.15, -0.5, -0.35], [0.55, 0.5, 0.45]) * r * [side, 1, 1]
            lesions.append(Lesion(tuple(float(c) for c in centre), radius * float(rng.uniform(0.7, 1)), hu))
    return Findings(float(rng.uniform(1.5, 2.4)) if hydrocephalus else 0.0, tuple(lesions))


def draw_shift(rng: np.random.Generator, findings: Findings, prevalence: float) -> Findings:
    """A midline shift of 3-10 mm (with probability `prevalence`) on top of `findings`."""
    if rng.random() >= prevalence:
        return findings
    return dataclasses.replace(
        findings,
        shift_mm=float(rng.uniform(3, 10)),
        shift_side=float(rng.choice([-1.0, 1.0])),
        hematoma_hu=float(rng.uniform(55, 80)),
    )


def ventricle_scale(anatomy: Anatomy, findings: Findings) -> float:
    """The ventricles' size: the anatomy's, enlarged by hydrocephalus and by atrophy (ex vacuo)."""
    return anatomy.ventricle_scale * (findings.hydrocephalus or 1.0) * (1 + 0.35 * findings.atrophy)


def draw_atrophy(rng: np.random.Generator, findings: Findings, prevalence: float) -> Findings:
    """Atrophy of severity 0.25-1 (with probability `prevalence`) on top of `findings`."""
    if rng.random() >= prevalence:
        return findings
    return dataclasses.replace(findings, atrophy=float(rng.uniform(0.25, 1.0)))


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int = 12) -> np.ndarray:
    """Smooth unit-variance-ish random field: coarse Gaussian noise upsampled trilinearly."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, 1, cells, cells, cells), dtype=np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def _fit(shape: Sequence[int], spacing: Sequence[float], anatomy: Anatomy) -> float:
    """The head's scale on the grid: 1, or less where the grid is too small for it (tests)."""
    extent = np.asarray(shape) * np.asarray(spacing)
    return min(1.0, float(np.min(0.92 * extent / (2 * np.asarray(anatomy.radii)))))


def head_to_grid(
    point: Sequence[float], anatomy: Anatomy, shape: Sequence[int], spacing: Sequence[float]
) -> np.ndarray:
    """Where a head-frame point (mm, before pose) lies in the grid's own frame: voxel index times
    spacing, in mm (for `write_store`'s 224^3 1 mm heads, the stored RAS 1 mm frame)."""
    c, s = np.cos(np.radians(anatomy.yaw_deg)), np.sin(np.radians(anatomy.yaw_deg))
    u = np.array([c * point[0] - s * point[1], s * point[0] + c * point[1], point[2]])  # undo the yaw
    n, sp = np.asarray(shape, float), np.asarray(spacing, float)
    return ((u + anatomy.shift) * _fit(shape, spacing, anatomy) / sp + (n - 1) / 2) * sp


def synthetic_head(
    rng: np.random.Generator,
    shape: Sequence[int] = (224, 224, 224),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    anatomy: Anatomy | None = None,
    findings: Findings | None = None,
) -> np.ndarray:
    """Float32 HU volume on a RAS grid (axes R, A, S) of `shape` voxels of `spacing` mm, the head
    centred (plus the anatomy's shift). Defaults: a fresh random anatomy, no findings. A grid
    smaller than the head (tests) scales the head to fit."""
    return render_head(rng, shape, spacing, anatomy, findings)[0]


def render_head(
    rng: np.random.Generator,
    shape: Sequence[int] = (224, 224, 224),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    anatomy: Anatomy | None = None,
    findings: Findings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`synthetic_head` and its label volume (uint8, `MASK_CLASSES`: 0 elsewhere, 1 the lateral
    ventricles, 2 the hemorrhage lesions), drawn from the same generator calls."""
    anatomy = anatomy or draw_anatomy(rng)
    findings = findings or Findings()
    fit = _fit(shape, spacing, anatomy)
    axes = [
        (np.arange(n, dtype=np.float32) - (n - 1) / 2) * s / fit - d  # the shift scales with the head
        for n, s, d in zip(shape, spacing, anatomy.shift, strict=True)
    ]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c, s = np.cos(np.radians(anatomy.yaw_deg)), np.sin(np.radians(anatomy.yaw_deg))
    x, y = c * x + s * y, -s * x + c * y  # head frame: R/A in the head's own axes
    a = anatomy.radii
    r = np.sqrt((x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2)  # 1 at the scalp surface
    inner = 1 - anatomy.skull_mm / min(a)  # inner skull surface
    rim = (1 + 4 * findings.atrophy) / min(a) if findings.atrophy else 0.0  # atrophy's CSF rim
    brain = r < inner - 0.03 - rim
    hu = np.full(r.shape, AIR, np.float32)
    hu[r < 1.0] = 30.0  # scalp
    hu[(r < 0.97) & ~brain] = anatomy.skull_hu
    hu[brain] = anatomy.grey_hu
    hu[r < 0.75 * inner] = anatomy.white_hu
    if findings.atrophy:  # the rim, and widened sulci: CSF where a fine random field is high
        hu[(r < inner - 0.03) & ~brain] = CSF
        cortex = brain & (r > 0.82 * inner)
        field_ = _smooth_field(rng, r.shape, cells=24)
        hu[cortex & (field_ > np.quantile(field_[cortex], 0.92 - 0.25 * findings.atrophy))] = CSF

    def region(centre, radius):  # the grid's box around a head-frame point, and its coordinates
        u = (c * centre[0] - s * centre[1], s * centre[0] + c * centre[1], centre[2])  # undo the yaw
        idx = [np.flatnonzero(np.abs(g - ui) <= radius) for g, ui in zip(axes, u, strict=True)]
        sl = tuple(slice(i[0], i[-1] + 1) if len(i) else slice(0, 0) for i in idx)
        return sl, x[sl[0], sl[1], :], y[sl[0], sl[1], :], z[:, :, sl[2]]

    if findings.shift_mm:  # the hematoma: a crescent under the inner skull, thickest laterally
        side, thick = findings.shift_side, findings.shift_mm / 0.6
        lateral = np.clip(side * x / a[0], 0, None) * (z > -0.4 * a[2])
        hu[brain & (r > inner - 0.03 - thick * lateral / min(a))] = findings.hematoma_hu
    label = np.zeros(r.shape, np.uint8)
    vs = ventricle_scale(anatomy, findings)
    mid = -findings.shift_side * findings.shift_mm  # the midline structures, pushed away from it
    for side in (-1, 1):  # two lateral ventricles either side of the midline
        cx = mid + side * 5 * vs
        sl, xs, ys, zs = region((cx, 0.0, 8.0), 23 * vs)
        vr = ((xs - cx) / (5 * vs)) ** 2 + (ys / (22 * vs)) ** 2 + ((zs - 8) / (10 * vs)) ** 2
        inside = brain[sl] & (vr < 1)
        hu[sl][inside] = CSF
        label[sl][inside] = 1
    for les in findings.lesions:
        sl, xs, ys, zs = region(les.centre, les.radius)
        d2 = (xs - les.centre[0]) ** 2 + (ys - les.centre[1]) ** 2 + (zs - les.centre[2]) ** 2
        inside = brain[sl] & (d2 < les.radius**2)
        hu[sl][inside] = les.hu
        label[sl][inside] = 2
    hu += np.where(brain, anatomy.texture_hu * _smooth_field(rng, r.shape), 0).astype(np.float32)
    hu += anatomy.noise_hu * rng.standard_normal(r.shape, dtype=np.float32)
    return hu, label


def lesion_ml(findings: Findings) -> float:
    return sum(4 / 3 * np.pi * les.radius**3 for les in findings.lesions) / 1000


def draw_survival(rng: np.random.Generator, findings: Findings) -> tuple[float, bool]:
    """Years to an event whose hazard grows with the findings (a Cox model, log hazard ratios:
    1.0 for hydrocephalus, 0.15 per ml of hemorrhage, 1.5 x atrophy severity, 0.1 per mm of
    midline shift; baseline median 5 years), censored at the end of a 1-8 year follow-up.
    Returns (years, whether the event was seen)."""
    risk = (
        1.0 * (findings.hydrocephalus > 0)
        + 0.15 * lesion_ml(findings)
        + 1.5 * findings.atrophy
        + 0.1 * findings.shift_mm
    )
    event_time = rng.exponential(5 / np.log(2) * np.exp(-risk))
    follow_up = rng.uniform(1, 8)
    return float(min(event_time, follow_up)), bool(event_time <= follow_up)


@dataclass(frozen=True)
class Scan:
    volume: np.ndarray  # float32 HU
    anatomy: Anatomy
    findings: Findings
    labels: np.ndarray | None = None  # uint8 label volume (MASK_CLASSES), when asked for
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    survival: tuple[float, bool] | None = None  # (years, event seen), when asked for

    def record(self) -> dict:
        """Labels and the continuous facts behind them (regression, survival and point targets).
        The lesion point is the centre of the largest hemorrhage in the grid's frame (voxel index
        x spacing, mm; NaN without one); the ventricle volume is the two ellipsoids'."""
        vs = ventricle_scale(self.anatomy, self.findings)
        largest = max(self.findings.lesions, key=lambda les: les.radius, default=None)
        point = (
            head_to_grid(largest.centre, self.anatomy, self.volume.shape, self.spacing)
            if largest
            else np.full(3, np.nan)
        )
        return {
            **self.findings.labels(),
            "ventricle_scale": vs,
            "ventricle_ml": float(2 * 4 / 3 * np.pi * (5 * 22 * 10) * vs**3 / 1000),
            "lesion_ml": float(lesion_ml(self.findings)),
            **{f"lesion_{axis}_mm": float(v) for axis, v in zip("xyz", point, strict=True)},
            "midline_shift_mm": self.findings.shift_mm,
            "atrophy_severity": self.findings.atrophy,
            "noise_hu": self.anatomy.noise_hu,
            "skull_hu": self.anatomy.skull_hu,
            **(dict(zip(("survival_years", "survival_event"), self.survival)) if self.survival else {}),
        }


def synthetic_scan(
    rng: np.random.Generator,
    prevalence: float = 0.4,
    shape: Sequence[int] = (224, 224, 224),
    vary: bool = True,
    midline_shift: float = 0.0,
    atrophy: float = 0.0,
    survival: bool = False,
    masks: bool = False,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Scan:
    """A random head whose findings are each present with probability `prevalence` (a midline
    shift with probability `midline_shift`, atrophy with probability `atrophy`). `vary=False`
    keeps one normal anatomy for every scan (only the findings and the noise differ): the easy data
    of tests that check a pipeline can learn at all. `survival`: a survival time that depends on
    the findings (`draw_survival`); `masks`: keep the label volume. Whether a head has a shift or
    atrophy, and its survival, are drawn from child streams of `rng`, so a head without them is the
    head the same `rng` gives without asking for them."""
    children = rng.spawn(3) if midline_shift or atrophy or survival else (None, None, None)
    anatomy = draw_anatomy(rng) if vary else Anatomy()
    hemorrhage, hydrocephalus = (bool(v) for v in rng.random(2) < prevalence)
    findings = draw_findings(rng, anatomy, hemorrhage, hydrocephalus)
    if midline_shift:
        findings = draw_shift(children[0], findings, midline_shift)
    if atrophy:
        findings = draw_atrophy(children[1], findings, atrophy)
    hu, labels = render_head(rng, shape, spacing, anatomy, findings)
    return Scan(
        hu,
        anatomy,
        findings,
        labels if masks else None,
        tuple(float(v) for v in spacing),
        draw_survival(children[2], findings) if survival else None,
    )


def to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def write_store(
    uri: str,
    n: int,
    site: str = "synthetic",
    storage=None,
    splits: tuple[str, ...] = ("train",),
    seed: int = 0,
    prevalence: float = 0.4,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
    midline_shift: float = 0.0,
    atrophy: float = 0.0,
    survival: bool = False,
    masks: bool = False,
) -> pd.DataFrame:
    """Write `n` synthetic 224^3 heads straight into a site store (scan ids `<site>-0000`..., the
    stored frame, no ingest) with a manifest; returns one row per scan: scan_id, patient_id, split
    and `Scan.record()` (labels and their continuous facts). Scan `i` depends on (seed, i) only, so
    `threads` (default: one per core, at most 4) changes nothing but the speed. `midline_shift`,
    `atrophy`: the prevalence of those findings; `survival`: survival targets (`synthetic_scan`);
    `masks`: each head's label volume is stored beside it as mask "anatomy" (`MASK_CLASSES`)."""
    from fmct_ray.ingest.store import SiteStore, StoreConfig, checksum

    store = SiteStore(uri, storage)
    store.init(site)

    def make(i: int) -> tuple[dict, np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng([seed, i])
        scan = synthetic_scan(
            rng, prevalence, midline_shift=midline_shift, atrophy=atrophy, survival=survival, masks=masks
        )
        return scan.record(), to_int16(scan.volume), scan.labels

    # heads are drawn in threads (numpy and torch release the GIL), a few at a time so that memory
    # stays flat, and written and committed in order
    workers = threads or min(4, os.cpu_count() or 1)
    rows = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, n, 2 * workers):
            batch = range(start, min(n, start + 2 * workers))
            for i, (record, vol, labels) in zip(batch, pool.map(make, batch), strict=True):
                scan_id = f"{site}-{i:04d}"
                store.write_volume(scan_id, vol, np.eye(4), StoreConfig(verify_writes=False))
                row = {
                    "scan_id": scan_id,
                    "patient_id": f"{site}-p{i:04d}",
                    "site": site,
                    "split": splits[i % len(splits)],
                }
                stored = {"stored_shape": list(vol.shape), "checksum": checksum(vol)}
                if masks:
                    store.write_mask(scan_id, "anatomy", labels, np.eye(4))
                    stored["masks"] = ["anatomy"]
                store.commit({**row, **stored})
                rows.append({**row, **record})
                if log and (i + 1) % 50 == 0:
                    log(f"  {site}: {i + 1}/{n} scans written")
    store.consolidate()
    return pd.DataFrame(rows)


def orientation_affine(codes: str, shape: tuple[int, ...], spacing: tuple[float, float, float]) -> tuple:
    """Reorder/flip a RAS array into axis `codes` (e.g. "LPS", "PIR"); returns (transform, affine).

    The transform maps a RAS-indexed array to the stored array; the affine maps stored voxel
    indices to RAS+ millimetres, so reading the file back and reorienting recovers the head.
    """
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    perm = [axis_of[c] for c in codes]
    flips = [c in "LPI" for c in codes]
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for out_axis, (src, flip) in enumerate(zip(perm, flips)):
        n = shape[src]
        affine[src, out_axis] = -spacing[out_axis] if flip else spacing[out_axis]
        affine[src, 3] = (n - 1) * spacing[out_axis] / 2 if flip else -(n - 1) * spacing[out_axis] / 2

    def transform(ras: np.ndarray) -> np.ndarray:
        out = np.transpose(ras, perm)
        for axis, flip in enumerate(flips):
            if flip:
                out = np.flip(out, axis)
        return np.ascontiguousarray(out)

    return transform, affine


def write_site(
    folder: str | Path,
    n: int,
    seed: int,
    prevalence: float = 0.4,
    orientations: tuple[str, ...] = ("RAS", "LPS", "LAS", "LPI", "PIR"),
    shape: tuple[int, int, int] = (170, 200, 160),
    vary: bool = True,
    masks: bool = False,
) -> list[dict]:
    """Write `n` synthetic scans as NIfTI under `folder`; returns one label dict per scan.

    Each file is `<patient>/<scan>.nii.gz` (patients have one or two scans); each finding is present
    with probability `prevalence`. The grid is smaller than 224^3, so the ingest pads it. Besides
    the binary labels, each row has typed targets as a label file gives them: `ventricle_ml`,
    `survival_years` / `survival_event`, and the largest lesion's centre `lesion_{x,y,z}` in the
    file's RAS world frame (mm; empty without a lesion). `masks`: each head's label volume
    (`MASK_CLASSES`) beside it as `<scan>_anatomy.nii.gz`, in the scan's orientation.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    rows = []
    for i in range(n):
        patient = f"p{seed:03d}{i // 2 if i % 3 == 0 else i:04d}"
        scan = synthetic_scan(rng, prevalence, shape, vary, survival=True, masks=masks)
        transform, affine = orientation_affine(orientations[i % len(orientations)], shape, (1.0, 1.0, 1.0))
        path = folder / patient / f"scan{i:04d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        for data, file in [(to_int16(scan.volume), path)] + (
            [(scan.labels, path.with_name(f"scan{i:04d}_anatomy.nii.gz"))] if masks else []
        ):
            img = nib.Nifti1Image(transform(data), affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, file)
        record = scan.record()
        # the grid's RAS-ordered index x 1 mm -> the file's world frame (origin at the grid's centre)
        centre = [record[f"lesion_{a}_mm"] - (m - 1) / 2 for a, m in zip("xyz", shape, strict=True)]
        rows.append(
            {
                "file": str(path.relative_to(folder)),
                "patient": patient,
                **scan.findings.labels(),
                **{k: record[k] for k in ("ventricle_ml", "survival_years", "survival_event")},
                **{f"lesion_{a}": v for a, v in zip("xyz", centre, strict=True)},
            }
        )
    return rows


def ingest_synthetic_sites(
    out: str | Path,
    sites: dict[str, int],
    seed: int = 100,
    ingest_overrides: Sequence[str] = (),
    prevalence: float = 0.4,
    log: Callable[[str], None] = print,
    vary: bool = True,
    masks: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic scans -> ingest -> labels, for the demo and the tests.

    For each site (name -> number of synthetic scans, site k drawn with seed `seed + k`), writes
    `out/raw/<site>/synthetic/<patient>/<scan>.nii.gz` and `out/raw/<site>_labels.csv` unless they
    exist (anything else under `out/raw/<site>`, e.g. linked real scans, is ingested as well), runs
    `run_ingest` into `out/stores/<site>` (`configs/ingest/default.yaml` + `ingest_overrides`; the
    patient is the NIfTI file's folder), then derives `out/labels/labels.parquet` from one label CSV
    of every site with `site_labels` (`configs/labels/synthetic.yaml`: the binary findings and
    the typed targets of `write_site`). `masks`: the heads' label volumes are written and ingested
    too (mask "anatomy"). The site secret must be in the environment (`FMCT_SITE_SECRET`).
    Returns (labels, label report).
    """
    from fmct_ray import config as config_lib
    from fmct_ray.eval.labels import LabelConfig, site_labels
    from fmct_ray.ingest.pipeline import IngestConfig, run_ingest
    from fmct_ray.sites import SiteSpec

    out = Path(out)
    overrides = [
        "patient_id_pattern=([^/]+)/[^/]+$",
        *(["masks={anatomy: _anatomy.nii.gz}"] if masks else []),
    ]
    overrides += ingest_overrides
    cfg = config_lib.load(IngestConfig, ROOT / "configs/ingest/default.yaml", overrides)
    label_rows = []
    for k, (site, n) in enumerate(sites.items()):
        raw, csv = out / "raw" / site, out / "raw" / f"{site}_labels.csv"
        if not csv.exists():
            rows = write_site(
                raw / "synthetic", n=n, seed=seed + k, prevalence=prevalence, vary=vary, masks=masks
            )
            pd.DataFrame([{**r, "file": f"synthetic/{r['file']}"} for r in rows]).to_csv(csv, index=False)
        log(f"\n== ingest {site} from {raw}")
        log(f"== {site}: {run_ingest(site, str(raw), str(out / 'stores' / site), cfg)}")
        label_rows.append(pd.read_csv(csv))
    public = out / "raw" / "labels_all_sites.csv"
    pd.concat(label_rows).to_csv(public, index=False)
    labels, report = site_labels(
        config_lib.load(LabelConfig, ROOT / "configs/labels/synthetic.yaml"),
        [SiteSpec(site, str(out / "stores" / site)) for site in sites],
        out / "labels",
        public=public,
    )
    log(f"== labels: {len(labels)} scans\n{report.to_string(index=False)}")
    return labels, report
