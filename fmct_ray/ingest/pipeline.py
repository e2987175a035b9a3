"""The ingest job as a Ray Data pipeline: discover -> identify -> group by scan -> convert + write.

    files (driver lists the input tree once)
      -> map_batches(identify): read DICOM headers in parallel; every file gets a pseudonymous
         scan id (keyed hash of the SeriesInstanceUID, or of the NIfTI path) and patient id
      -> groupby(scan_id).map_groups(convert): skip committed scans, read + check + convert,
         write the volume, read it back, commit its manifest row
      -> driver: counts, manifest.parquet, quarantine.parquet, run record

Identity fields of DICOM headers never leave `identify`/`convert`: only keyed hashes (HMAC-SHA256
with a per-site secret) travel through Ray and reach the store, and the scan time is stored only
date-shifted per patient (`fmct_ray.ingest.privacy`). Failures of one input become a
quarantine row with the input path and the reason; the job goes on. Failures of storage (reading
an input's bytes, writing or committing to the store) are retried with backoff, then stop the job
with a `StorageError` naming the store and the cause: an unwritable store, refused credentials, a
full disk or an outage must not quarantine good scans. What was committed stays; a re-run skips it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from fmct_ray import config as config_lib
from fmct_ray.ingest.geometry import PreprocessConfig, convert, convert_mask
from fmct_ray.ingest.privacy import pseudonym, secret_check, shift_time, site_secret
from fmct_ray.ingest.quality import QualityConfig, check_header, check_intensities
from fmct_ray.ingest.readers import QuarantineError, read_dicom_header, read_dicom_series, read_nifti
from fmct_ray.ingest.series import SeriesSelection, select_primary
from fmct_ray.ingest.store import INGEST_VERSION, SiteStore, StoreConfig
from fmct_ray.storage import StorageConfig, StorageError, filesystem, is_local, storage_options

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Identification reads a DICOM file's first bytes only: a header ends where the pixel data element
# (7FE0,0010; little endian) begins, usually within a few kB; a longer header is read whole.
HEAD_BYTES = 64 * 1024
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


@dataclass(frozen=True)
class IngestConfig:
    """Root config of `jobs/ingest.py`.

    Args:
        preprocess: HU -> RAS -> 1 mm -> int16 -> 224^3 (SPEC section 1).
        quality: cohort gates (SPEC section 1); failures are quarantined.
        series: how the primary series of a study is chosen (`fmct_ray.ingest.series`).
        store: encoding of stored volumes.
        input_storage: how to reach the input tree (endpoint, credential references).
        output_storage: how to reach the store.
        secret_env: environment variable holding the site's pseudonymisation secret.
        patient_id_pattern: regex on a NIfTI file's path relative to the input root whose first
            group is the patient (None: one patient per file). DICOM uses PatientID.
        split_seed: salt of the patient -> split assignment.
        split_fractions: train / val / test fractions, by patient.
        num_cpus_per_scan: CPUs reserved by each conversion task.
        storage_retries: retries (exponential backoff from 0.5 s) of a failed read of an input
            or write to the store before the job stops with a `StorageError`.
        date_shift_days: scan times are stored moved by a per-patient whole number of days in
            [-date_shift_days, date_shift_days] (never 0), keyed with the site secret; 0 stores
            the real times (only for data cleared to keep dates).
        masks: label volumes aligned with the scans, name -> file suffix: the mask of
            `scan.nii.gz` is `scan<suffix>` and that of a DICOM series folder `folder<suffix>`
            beside it (e.g. {ventricles: _ventricles.nii.gz}). They go through their scan's
            geometry (nearest neighbour) into the store beside its volume (`SiteStore.read_mask`;
            manifest column `masks`); files with these suffixes are not scans. A scan without a
            mask is stored without it; an unreadable mask quarantines its scan.
    """

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    series: SeriesSelection = field(default_factory=SeriesSelection)
    store: StoreConfig = field(default_factory=StoreConfig)
    input_storage: StorageConfig = field(default_factory=StorageConfig)
    output_storage: StorageConfig = field(default_factory=StorageConfig)
    secret_env: str = "FMCT_SITE_SECRET"
    patient_id_pattern: str | None = None
    split_seed: str = "fmct-split-v1"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    num_cpus_per_scan: float = 1.0
    storage_retries: int = 3
    date_shift_days: int = 365
    masks: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.date_shift_days < 0:
            raise ValueError(
                f"date_shift_days must be >= 0 (0 disables shifting), got {self.date_shift_days}"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be non-negative and sum to 1, got {self.split_fractions}")
        if self.patient_id_pattern is not None:
            re.compile(self.patient_id_pattern)


def assign_split(patient_id: str, seed: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic train/val/test by patient; independent of what else is in the store."""
    u = int(hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()[:15], 16) / 16**15
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


# -- discovery (driver) ---------------------------------------------------------------------------
def discover(input_uri: str, storage: StorageConfig, skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Every non-hidden file under `input_uri` (or the file itself) but those ending in `skip`
    (the masks' suffixes), with its kind."""
    fs, root = filesystem(input_uri, storage)
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest: input {input_uri} does not exist")
    if fs.isfile(root):
        paths = [root]
    elif is_local(fs):  # follow symlinked folders, as sites often link their trees together
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files)
    else:
        paths = sorted(fs.find(root))
    prefix = "" if is_local(fs) else input_uri.split("://", 1)[0] + "://"
    base = posixpath.dirname(root) if fs.isfile(root) else root
    items = []
    for path in paths:
        rel = posixpath.relpath(path, base)
        if any(part.startswith(".") for part in rel.split("/")) or path.endswith(skip):
            continue
        kind = "nifti" if path.lower().endswith(NIFTI_SUFFIXES) else "dicom"
        items.append({"path": prefix + path, "rel": rel, "kind": kind})
    return items


# -- per-file identification (Ray tasks) ----------------------------------------------------------
class Identify:
    """map_batches function: give every file a scan id and patient id (keyed hashes)."""

    def __init__(self, secret: bytes, cfg: IngestConfig, options: dict[str, Any]):
        self.secret, self.cfg, self.options = secret, cfg, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[str]] = {"path": [], "scan_id": [], "patient_id": [], "kind": [], "error": []}
        for path, rel, kind in zip(batch["path"], batch["rel"], batch["kind"], strict=True):
            scan_key, patient_key, error = self._keys(str(path), str(rel), str(kind))
            out["path"].append(str(path))
            out["kind"].append(str(kind))
            out["error"].append(error)
            out["scan_id"].append(pseudonym(self.secret, "scan", scan_key))
            out["patient_id"].append(pseudonym(self.secret, "patient", patient_key))
        return {k: np.asarray(v, dtype=object) for k, v in out.items()}

    def _head(self, path: str) -> bytes:
        """The file's first `HEAD_BYTES` (a ranged read on object storage), or all of it when its
        header runs past them."""
        retries = self.cfg.storage_retries
        head = with_retries(lambda: read_bytes(path, self.options, HEAD_BYTES), f"input {path}", retries)
        if len(head) == HEAD_BYTES and PIXEL_DATA_TAG not in head:
            head = with_retries(lambda: read_bytes(path, self.options), f"input {path}", retries)
        return head

    def _keys(self, path: str, rel: str, kind: str) -> tuple[str, str, str]:
        if kind == "nifti":
            match = re.search(self.cfg.patient_id_pattern, rel) if self.cfg.patient_id_pattern else None
            patient = match.group(1) if match else re.sub(r"\.nii(\.gz)?$", "", rel, flags=re.I)
            return f"nifti:{rel}", patient, ""
        head = self._head(path)
        try:
            header = read_dicom_header(head, path)
        except QuarantineError as err:
            return f"bad:{rel}", f"bad:{rel}", err.reason
        except Exception as err:  # noqa: BLE001 - any unreadable file is quarantined, not fatal
            return f"bad:{rel}", f"bad:{rel}", f"unreadable: {type(err).__name__}"
        series = header["series_key"]
        return f"dicom:{series}", header.get("patient_key") or f"series:{series}", ""


def with_retries(fn, what: str, retries: int, backoff_s: float = 0.5):
    """`fn()`, retrying storage errors up to `retries` times with exponential backoff; then (or
    at once for a permission error, a full disk or a missing file) `StorageError` naming `what`."""
    for attempt in itertools.count():
        try:
            return fn()
        except QuarantineError:
            raise
        except Exception as err:  # noqa: BLE001 - s3fs, botocore, aiohttp and OS errors alike
            permanent = isinstance(err, PermissionError | FileNotFoundError | NotADirectoryError) or (
                isinstance(err, OSError) and err.errno == errno.ENOSPC
            )
            if permanent or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                refused = isinstance(err, PermissionError)
                hint = " (access refused: check the credentials and permissions)" if refused else ""
                raise StorageError(f"{what}: {type(err).__name__}: {err}{tries}{hint}") from err
            time.sleep(backoff_s * 2**attempt)


def storage_cause(err: BaseException | None, depth: int = 0) -> StorageError | None:
    """The `StorageError` behind `err` (Ray wraps task errors in its own, with the cause chained)."""
    if err is None or depth > 10:
        return None
    if isinstance(err, StorageError):
        return err
    for nxt in (getattr(err, "cause", None), err.__cause__, err.__context__):
        if isinstance(nxt, BaseException) and nxt is not err and (found := storage_cause(nxt, depth + 1)):
            return found
    return None


def read_bytes(path: str, options: dict[str, Any], size: int | None = None) -> bytes:
    """The file's bytes, or its first `size` bytes (one ranged GET on object storage)."""
    if "://" in path:
        import fsspec

        protocol = path.split("://", 1)[0]
        return fsspec.filesystem(protocol, **options).cat_file(path, start=0 if size else None, end=size)
    with open(path, "rb") as f:
        return f.read(size if size else -1)


# -- per-scan conversion (Ray tasks) --------------------------------------------------------------
class Convert:
    """map_groups function: one group = the files of one scan -> one committed volume."""

    def __init__(
        self,
        site: str,
        store_uri: str,
        cfg: IngestConfig,
        in_opts: dict,
        out_opts: dict,
        done: set[str],
        secret: bytes,
    ):
        self.site, self.store_uri, self.cfg = site, store_uri, cfg
        self.in_opts, self.out_opts, self.done, self.secret = in_opts, out_opts, done, secret

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        scan_id, paths = str(group["scan_id"][0]), [str(p) for p in group["path"]]
        source = paths[0] if len(paths) == 1 else posixpath.dirname(paths[0]) + "/"
        status, reason = "written", ""
        if scan_id in self.done:
            status = "skipped"
        else:
            try:
                self._ingest(scan_id, str(group["patient_id"][0]), str(group["kind"][0]), paths, group)
            except QuarantineError as err:
                status, reason = "quarantined", err.reason
        return {
            "scan_id": np.array([scan_id], dtype=object),
            "status": np.array([status], dtype=object),
            "path": np.array([source], dtype=object),
            "reason": np.array([reason], dtype=object),
            "seconds": np.array([time.perf_counter() - start]),
        }

    def _ingest(self, scan_id: str, patient_id: str, kind: str, paths: list[str], group) -> None:
        """Read (storage: retried, then `StorageError`), convert (any failure is the input's:
        quarantined), write and commit (storage again)."""
        errors = [e for e in group["error"] if e]
        if errors:
            raise QuarantineError(str(errors[0]), paths[0])
        retries = self.cfg.storage_retries
        blobs = [with_retries(lambda p=p: read_bytes(p, self.in_opts), f"input {p}", retries) for p in paths]
        try:
            if kind == "nifti":
                raw = read_nifti(blobs[0], paths[0])
            else:
                raw = read_dicom_series(
                    list(zip(paths, blobs, strict=True)), max_gap_factor=self.cfg.quality.max_gap_factor
                )
            check_header(raw.meta, self.cfg.quality)
            check_intensities(raw.array, self.cfg.quality)
            volume, affine = convert(raw, self.cfg.preprocess)
        except QuarantineError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever a bad input makes the readers raise
            raise QuarantineError(f"conversion failed: {type(err).__name__}: {err}", paths[0]) from err
        store = SiteStore(self.store_uri, options=self.out_opts)
        where = f"store {self.store_uri}"
        masks = self._masks(kind, paths, affine)
        write = functools.partial(store.write_volume, scan_id, volume, affine, self.cfg.store)
        digest = with_retries(write, where, retries)
        for name, mask in masks.items():
            with_retries(functools.partial(store.write_mask, scan_id, name, mask, affine), where, retries)
        shifted = shift_time(raw.acquired, self.secret, patient_id, self.cfg.date_shift_days)
        row = manifest_row(scan_id, patient_id, self.site, kind, raw.meta, volume, digest, self.cfg)
        row = {**row, **time_fields(shifted, self.secret, self.cfg.date_shift_days), **self._series(raw)}
        if self.cfg.masks:
            row["masks"] = sorted(masks)
        with_retries(lambda: store.commit(row), where, retries)

    def _masks(self, kind: str, paths: list[str], stored_affine: np.ndarray) -> dict[str, np.ndarray]:
        """The scan's masks that exist (`IngestConfig.masks`), on its stored grid."""
        source = (
            re.sub(r"\.nii(\.gz)?$", "", paths[0], flags=re.I)
            if kind == "nifti"
            else posixpath.dirname(paths[0])
        )
        found, retries = {}, self.cfg.storage_retries
        for name, suffix in self.cfg.masks.items():
            path = source + suffix
            try:
                blob = with_retries(lambda p=path: read_bytes(p, self.in_opts), f"input {path}", retries)
            except StorageError as err:
                if isinstance(err.__cause__, FileNotFoundError):
                    continue  # this scan has no such mask
                raise
            try:
                raw = read_nifti(blob, path)
                found[name] = convert_mask(raw.array, raw.affine, stored_affine, self.cfg.preprocess.size)
            except QuarantineError as err:
                raise QuarantineError(f"mask {name!r} {path}: {err.reason}", paths[0]) from err
            except Exception as err:  # noqa: BLE001 - whatever a bad mask makes the readers raise
                raise QuarantineError(f"mask {name!r} {path}: {type(err).__name__}: {err}", paths[0]) from err
        return found

    def _series(self, raw) -> dict[str, Any]:
        """Study pseudonym, selection flags and keyed slice ids (`RawScan`'s raw keys, hashed)."""
        hashed = [pseudonym(self.secret, "slice", k) for k in raw.instance_keys if k]
        return {
            "study_id": pseudonym(self.secret, "study", raw.study_key) if raw.study_key else None,
            **self.cfg.series.flags(raw.description, raw.meta.get("kernel")),
            "slice_ids": hashed if len(hashed) == len(raw.instance_keys) else [],
        }


def manifest_row(
    scan_id: str,
    patient_id: str,
    site: str,
    kind: str,
    meta: dict,
    volume: np.ndarray,
    digest: str,
    cfg: IngestConfig,
) -> dict[str, Any]:
    def num(value):
        return None if value is None else float(value)

    return {
        "scan_id": scan_id,
        "patient_id": patient_id,
        "site": site,
        "split": assign_split(patient_id, cfg.split_seed, cfg.split_fractions),
        "source_format": kind,
        "modality": meta.get("modality"),
        "orig_shape": [int(s) for s in meta["shape"]],
        "orig_spacing": [float(s) for s in meta["spacing"]],
        "orig_orientation": str(meta["orientation"]),
        "slice_thickness": num(meta.get("slice_thickness")),
        "n_slices": int(meta["n_slices"]),
        "kernel": meta.get("kernel"),
        "manufacturer": meta.get("manufacturer"),
        "kvp": num(meta.get("kvp")),
        "stored_shape": [int(s) for s in volume.shape],
        "checksum": digest,
        "ingest_version": INGEST_VERSION,
    }


def time_fields(scan_time: datetime | None, secret: bytes, date_shift_days: int) -> dict[str, Any]:
    """Manifest fields of an (already shifted) scan time: ISO text in the JSON row, the shift bound it
    was stored with, and the secret check the labels job compares before shifting EHR times."""
    return {
        "scan_time": None if scan_time is None else scan_time.isoformat(),
        "date_shift_days": int(date_shift_days),
        "secret_check": secret_check(secret) if date_shift_days else None,
    }


# -- the job --------------------------------------------------------------------------------------
def run_ingest(site: str, input_uri: str, store_uri: str, cfg: IngestConfig) -> dict[str, Any]:
    """Ingest every scan under `input_uri` into the site store at `store_uri`; returns the summary."""
    import ray

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", site):
        raise ValueError(f"site name {site!r}: use letters, digits, '_', '.', '-'")
    secret = site_secret(cfg.secret_env, "ingest runs")
    start = time.perf_counter()
    store = SiteStore(store_uri, cfg.output_storage)
    with_retries(store.attrs, f"store {store_uri}", cfg.storage_retries)  # reachable, and lets us in
    store.init(site)
    done = store.committed_ids()
    files = discover(input_uri, cfg.input_storage, tuple(cfg.masks.values()))
    if not files:
        raise ValueError(f"no files under {input_uri}")
    in_opts = storage_options(cfg.input_storage) if "://" in input_uri else {}
    out_opts = storage_options(cfg.output_storage) if "://" in store_uri else {}
    identify = Identify(secret, cfg, in_opts)
    select = functools.partial(select_primary, policy=cfg.series)
    convert_one = Convert(site, store_uri, cfg, in_opts, out_opts, done, secret)

    def identify_files(batch):
        return identify(batch)

    def convert_scan(group):
        return convert_one(group)

    ds = (
        ray.data.from_items(files, override_num_blocks=max(1, min(len(files) // 16, 256)))
        .map_batches(identify_files, batch_size=16)
        .groupby("scan_id", num_partitions=max(1, min(len(files) // 8, 200)))
        .map_groups(convert_scan, num_cpus=cfg.num_cpus_per_scan, batch_format="numpy")
    )
    try:
        results = list(ds.iter_rows())
    except Exception as err:  # Ray wraps a task's StorageError; the job gets it plain
        cause = storage_cause(err)
        if cause is None:
            raise
        with contextlib.suppress(Exception):  # the store may still be down: its rows stay committed
            store.consolidate(select)  # what was committed before the failure is in the manifest
        raise StorageError(str(cause)) from None
    manifest = store.consolidate(select)
    quarantined = [
        {"path": r["path"], "reason": r["reason"]} for r in results if r["status"] == "quarantined"
    ]
    store.write_quarantine(quarantined)
    seconds = time.perf_counter() - start
    counts = {s: sum(r["status"] == s for r in results) for s in ("written", "skipped", "quarantined")}
    summary = {
        "site": site,
        "scans_found": len(results),
        **counts,
        "manifest_rows": len(manifest),
        "seconds": round(seconds, 2),
        "scans_per_s": round(counts["written"] / seconds, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    run_dir = f"runs/{summary['finished_at'].replace(':', '')}"
    store.write_text(f"{run_dir}/config.yaml", config_lib.dump(cfg))
    store.write_text(f"{run_dir}/summary.json", json.dumps(summary, indent=1))
    # this run's quarantine, kept (quarantine.parquet at the root is the latest run's)
    store.write_text(
        f"{run_dir}/quarantine.csv", pd.DataFrame(quarantined, columns=["path", "reason"]).to_csv(index=False)
    )
    return summary
