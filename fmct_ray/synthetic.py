"""Head-like synthetic CT volumes with planted findings, for the demo and the tests.

A volume is an ellipsoidal head in air: scalp, a bony skull shell, grey and white matter, CSF
ventricles, Gaussian noise. Findings are planted where a label says so: "hemorrhage" as small
bright (acute-blood, 65-85 HU) blobs in the brain, "hydrocephalus" as enlarged ventricles. The
images are written as NIfTI in varied orientations so the ingest's reorientation is exercised.

`ingest_synthetic_sites` is the whole path from nothing to labelled site stores, shared by the demo
and the end-to-end tests: NIfTI files plus a label CSV per site (`write_site`), the real ingest job
into one store per site, and labels joined by the pseudonymised NIfTI path (`make_labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

FINDINGS = ("hemorrhage", "hydrocephalus")
ROOT = Path(__file__).resolve().parents[1]


def synthetic_head(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (160, 190, 150),
    findings: dict[str, bool] | None = None,
) -> np.ndarray:
    """Float32 HU volume on a 1 mm RAS grid (axes R, A, S) with the given findings planted."""
    findings = findings or {}
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) - n / 2 for n in shape], indexing="ij"))
    radii = np.array([68, 88, 70], np.float32) * rng.uniform(0.92, 1.05, 3).astype(np.float32)
    r = np.sqrt(sum((grid[i] / radii[i]) ** 2 for i in range(3)))  # 1 at the outer scalp surface
    hu = np.full(shape, -1000.0, np.float32)
    hu[r < 1.0] = 30.0  # scalp
    hu[r < 0.95] = rng.uniform(900, 1400)  # skull
    brain = r < 0.87
    hu[brain] = 38.0  # grey matter
    hu[brain & (r < 0.7)] = 26.0  # white matter
    vent_scale = 2.4 if findings.get("hydrocephalus") else 1.0
    vr = np.sqrt(
        (grid[0] / (9 * vent_scale)) ** 2
        + (grid[1] / (22 * vent_scale)) ** 2
        + ((grid[2] - 8) / (11 * vent_scale)) ** 2
    )
    hu[brain & (vr < 1)] = 6.0  # CSF
    if findings.get("hemorrhage"):
        for _ in range(int(rng.integers(2, 5))):
            centre = rng.uniform(-0.45, 0.45, 3) * radii
            size = rng.uniform(3, 7)
            blob = sum((grid[i] - centre[i]) ** 2 for i in range(3)) < size**2
            hu[blob & brain] = rng.uniform(65, 85)
    hu += rng.normal(0, 6, shape).astype(np.float32)
    return hu


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
) -> list[dict]:
    """Write `n` synthetic scans as NIfTI under `folder`; returns one label dict per scan.

    Each file is `<patient>/<scan>.nii.gz` (patients have one or two scans); labels are drawn
    independently per finding with probability `prevalence`.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    rows = []
    for i in range(n):
        patient = f"p{seed:03d}{i // 2 if i % 3 == 0 else i:04d}"
        labels = {f: bool(rng.random() < prevalence) for f in FINDINGS}
        hu = synthetic_head(rng, findings=labels)
        transform, affine = orientation_affine(orientations[i % len(orientations)], hu.shape, (1.0, 1.0, 1.0))
        path = folder / patient / f"scan{i:04d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.round(transform(hu)).astype(np.int16), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, path)
        rows.append({"file": str(path.relative_to(folder)), "patient": patient, **labels})
    return rows


def ingest_synthetic_sites(
    out: str | Path,
    sites: dict[str, int],
    seed: int = 100,
    ingest_overrides: Sequence[str] = (),
    prevalence: float = 0.4,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic scans -> ingest -> labels, for the demo and the tests.

    For each site (name -> number of synthetic scans, site k drawn with seed `seed + k`), writes
    `out/raw/<site>/synthetic/<patient>/<scan>.nii.gz` and `out/raw/<site>_labels.csv` unless they
    exist (anything else under `out/raw/<site>`, e.g. linked real scans, is ingested as well), runs
    `run_ingest` into `out/stores/<site>` (`configs/ingest/default.yaml` + `ingest_overrides`; the
    patient is the NIfTI file's folder), then derives `out/labels/labels.parquet` from one label CSV
    of every site with `make_labels` (`configs/labels/synthetic.yaml`). The site secret must be in
    the environment (`FMCT_SITE_SECRET`). Returns (labels, label report).
    """
    from fmct_ray import config as config_lib
    from fmct_ray.eval.labels import LabelConfig, make_labels
    from fmct_ray.ingest import SiteStore
    from fmct_ray.ingest.pipeline import IngestConfig, run_ingest

    out = Path(out)
    overrides = ["patient_id_pattern=([^/]+)/[^/]+$", *ingest_overrides]
    cfg = config_lib.load(IngestConfig, ROOT / "configs/ingest/default.yaml", overrides)
    label_rows = []
    for k, (site, n) in enumerate(sites.items()):
        raw, csv = out / "raw" / site, out / "raw" / f"{site}_labels.csv"
        if not csv.exists():
            rows = write_site(raw / "synthetic", n=n, seed=seed + k, prevalence=prevalence)
            pd.DataFrame([{**r, "file": f"synthetic/{r['file']}"} for r in rows]).to_csv(csv, index=False)
        log(f"\n== ingest {site} from {raw}")
        log(f"== {site}: {run_ingest(site, str(raw), str(out / 'stores' / site), cfg)}")
        label_rows.append(pd.read_csv(csv))
    public = out / "raw" / "labels_all_sites.csv"
    pd.concat(label_rows).to_csv(public, index=False)
    manifest = pd.concat([SiteStore(str(out / "stores" / site)).manifest() for site in sites])
    labels, report = make_labels(
        config_lib.load(LabelConfig, ROOT / "configs/labels/synthetic.yaml"),
        manifest,
        out / "labels",
        public=public,
    )
    log(f"== labels: {len(labels)} scans\n{report.to_string(index=False)}")
    return labels, report
