"""Ingest benchmark on the real DICOM series (../shared/data/real/invesalius_0051_dicom).

Reports, in one process on this machine:
  1. ingest scans/s per core: read + gates + convert + write + verify of the series, on one thread,
     by CPU time (the Ray job runs one such task per core);
  2. stored bytes per scan for each store codec, against the same stored volume as .nii.gz;
  3. read time of one stored volume from a local store and from a loopback S3 server (moto), by
     zarr (`load_volume`) and by the single-GET path (`SiteStore.read_volume`), median of N reads.

    .venv/bin/python bench/bench_ingest.py [--repeats 3] [--reads 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from fmct_ray.ingest.geometry import PreprocessConfig, convert
from fmct_ray.ingest.quality import QualityConfig, check_header, check_intensities
from fmct_ray.ingest.readers import read_dicom_series
from fmct_ray.ingest.store import SiteStore, StoreConfig, load_volume
from fmct_ray.testing import S3Server

SERIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "invesalius_0051_dicom"


def ingest_once(files: list[Path], store: SiteStore, cfg: StoreConfig) -> tuple[np.ndarray, np.ndarray]:
    raw = read_dicom_series([(str(p), p.read_bytes()) for p in files])
    check_header(raw.meta, QualityConfig())
    check_intensities(raw.array, QualityConfig())
    volume, affine = convert(raw, PreprocessConfig())
    store.write_volume("bench", volume, affine, cfg)
    return volume, affine


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_reads(fn, n: int) -> float:
    fn()  # warm: open connections, caches of metadata
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reads", type=int, default=20)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    files = sorted(SERIES.iterdir())
    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))

    print(f"series: {SERIES.name}, {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    store = SiteStore(str(tmp / "store_cpu"))
    cpu = []
    for _ in range(args.repeats):
        start = time.process_time()
        volume, affine = ingest_once(files, store, StoreConfig())
        cpu.append(time.process_time() - start)
    print(
        f"1. ingest CPU s per scan (1 thread): median {statistics.median(cpu):.2f} "
        f"-> {1 / statistics.median(cpu):.2f} scans/s per core"
    )

    nii = tmp / "volume.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), nii)
    nii_bytes = nii.stat().st_size
    print(
        f"2. same stored volume as .nii.gz (nibabel default gzip): {nii_bytes / 1e6:.2f} MB; raw int16 "
        f"{volume.nbytes / 1e6:.1f} MB"
    )
    for codec in ("blosc-lz4", "blosc-zstd", "zstd"):
        st = SiteStore(str(tmp / f"store_{codec}"))
        st.write_volume("bench", volume, affine, StoreConfig(codec=codec))
        size = folder_bytes(tmp / f"store_{codec}" / "volumes" / "bench")
        dec = timed_reads(lambda st=st: st.read_volume("bench"), 5)
        print(
            f"   {codec:10s}: {size / 1e6:.2f} MB/scan = {size / nii_bytes:.2f}x the .nii.gz, "
            f"compression {volume.nbytes / size:.1f}x, local read+decode {dec * 1e3:.1f} ms"
        )

    local_uri = str(tmp / "store_blosc-lz4")
    with S3Server() as s3:
        os.environ.update(s3.env())
        s3.filesystem().mkdir("bench")
        s3_store = SiteStore("s3://bench/store")
        s3_store.write_volume("bench", volume, affine, StoreConfig())
        print(f"3. read of one stored volume (median of {args.reads}):")
        for name, uri in (("local", local_uri), ("S3 (moto, loopback)", "s3://bench/store")):
            ours = timed_reads(lambda uri=uri: load_volume(uri, "bench"), args.reads)
            st = SiteStore(uri)
            plain = timed_reads(
                lambda st=st: zarr.open_array(st._zarr_store(True), path="volumes/bench")[...], args.reads
            )
            print(
                f"   {name:20s} load_volume {ours * 1e3:6.1f} ms; plain zarr open+read {plain * 1e3:6.1f} ms "
                f"({plain / ours:.2f}x)"
            )
    print(f"(scratch folder {tmp})")


if __name__ == "__main__":
    main()
