"""The end-to-end demo behind `make demo`: every stage on a laptop-sized local Ray cluster.

Stages (each can run alone with `--stages`):
  ingest   real scans from ../shared/data/real plus generated head-like volumes with planted
           findings -> two local site stores (site_a: real + synthetic, site_b: synthetic)
  inspect  manifests, quarantine tables, and a picture of a stored real volume
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fmct_ray import config as config_lib
from fmct_ray.ingest import SiteStore
from fmct_ray.ingest.pipeline import IngestConfig, run_ingest
from fmct_ray.synthetic import write_site

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
SITES = {"site_a": 10, "site_b": 10}  # synthetic scans per site


def stage_ingest(out: Path) -> None:
    os.environ.setdefault("FMCT_SITE_SECRET", "demo-secret-not-for-real-sites")
    cfg = config_lib.load(IngestConfig, ROOT / "configs/ingest/default.yaml", ["patient_id_pattern=([^/]+)/[^/]+$"])
    for seed, (site, n) in enumerate(SITES.items()):
        raw = out / "raw" / site
        if not raw.exists():
            write_site(raw / "synthetic", n=n, seed=100 + seed)
            if site == "site_a" and REAL.exists():  # link, never copy, the real scans
                (raw / "real").mkdir(parents=True)
                (raw / "real" / "invesalius_0051").symlink_to(REAL / "invesalius_0051_dicom")
                (raw / "real" / "template.nii.gz").symlink_to(REAL / "ichseg_template_1mm_hu_skullstripped.nii.gz")
        print(f"\n== ingest {site} from {raw}")
        summary = run_ingest(site, str(raw), str(out / "stores" / site), cfg)
        print(f"== {site}: {summary}")


def stage_inspect(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "figures").mkdir(parents=True, exist_ok=True)
    for site in SITES:
        store = SiteStore(str(out / "stores" / site))
        manifest, quarantine = store.manifest(), store.quarantine()
        print(f"\n== {site}: {len(manifest)} scans; split {manifest['split'].value_counts().to_dict()}")
        print(manifest[["scan_id", "split", "source_format", "orig_orientation", "slice_thickness", "kvp"]]
              .to_string(index=False))
        print(f"quarantined: {len(quarantine)}")
        for row in quarantine.itertuples():
            print(f"  {row.path}: {row.reason}")
        dicom = manifest[manifest["source_format"] == "dicom"]
        row = (dicom if len(dicom) else manifest).iloc[0]
        vol = store.read_volume(row.scan_id, verify=True)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        planes = [vol[112].T, vol[:, 112].T, vol[:, :, 100].T]
        for ax, plane, name in zip(axes, planes, ["sagittal (x=112)", "coronal (y=112)", "axial (z=100)"]):
            ax.imshow(np.clip((plane + 40) / 160, 0, 1), cmap="gray", origin="lower")
            ax.set_title(name)
            ax.axis("off")
        fig.suptitle(f"{site} {row.source_format} scan {row.scan_id[:8]}: stored 224^3 int16 RAS, window 40/160")
        path = out / "figures" / f"{site}_stored_volume.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        print(f"picture of {row.scan_id}: {path}")


STAGES = {"ingest": stage_ingest, "inspect": stage_inspect}


def run(out: Path, stages: list[str]) -> Path:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in stages:
        STAGES[name](out)
    print(f"\nDemo output: {out}")
    return out
