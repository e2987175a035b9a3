"""The per-site Zarr v3 store: volumes, manifest, quarantine, run records.

Layout of a store (local path or `s3://bucket/prefix`):

    STORE/zarr.json                      root group (format and ingest version)
    STORE/volumes/<scan_id>/             one Zarr v3 array per scan: int16 HU, RAS, 1 mm,
                                         224^3, ONE chunk (one object per volume: a training
                                         read is one GET; RAY_ZARR_NOTES), blosc-compressed;
                                         attributes: affine (RAS, mm) and sha256 checksum
    STORE/masks/<name>/<scan_id>/        label volumes aligned with the scan (uint8, the same frame and
                                         one-chunk layout; manifest column `masks` lists their names)
    STORE/_rows/<scan_id>.json           commit marker + manifest row, written only after the
                                         volume was written and read back checksum-valid
    STORE/manifest.parquet               all committed rows (consolidated from _rows/), with
                                         the study's `primary` series marked (ingest/series.py)
    STORE/slices.parquet                 scan_id, slice_id: the keyed SOP instance ids of each
                                         DICOM scan's slices (per-slice public labels join here)
    STORE/quarantine.parquet             inputs rejected by the last run: path, reason
    STORE/runs/<UTC time>/               resolved config and summary of each ingest run

A scan exists in the store if and only if its `_rows/` marker exists; a job killed midway leaves
at most an uncommitted volume that the re-run overwrites, so every scan ends up stored exactly
once and every manifest row points at a complete volume.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numcodecs
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from fmct_ray.storage import (
    S3Objects,
    StorageConfig,
    StorageError,
    atomic_write,
    filesystem,
    is_local,
    is_remote,
    join,
    storage_options,
)

INGEST_VERSION = "2"  # 2: scan_time (date-shifted), date_shift_days, secret_check
STORE_FORMAT = "fmct_ray.store/1"


@dataclass(frozen=True)
class StoreConfig:
    """Encoding of stored volumes.

    Args:
        codec: blosc-lz4 (fastest decode, ~6 ms per 224^3 volume), blosc-zstd or zstd (smaller).
        clevel: compression level.
        verify_writes: read every volume back and compare its checksum before committing it.
    """

    codec: Literal["blosc-lz4", "blosc-zstd", "zstd"] = "blosc-lz4"
    clevel: int = 5
    verify_writes: bool = True


def checksum(volume: np.ndarray) -> str:
    """sha256 of the volume's little-endian C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(volume, dtype="<i2").tobytes()).hexdigest()


def _compressor(cfg: StoreConfig):
    if cfg.codec == "zstd":
        return ZstdCodec(level=cfg.clevel)
    cname = "lz4" if cfg.codec == "blosc-lz4" else "zstd"
    return BloscCodec(cname=cname, clevel=cfg.clevel, shuffle=BloscShuffle.shuffle, typesize=2)


def _decode_single_chunk(meta: dict, blob: bytes) -> np.ndarray | None:
    """Decode a single-chunk int16 array written by `write_volume` from its Zarr v3 metadata and
    chunk bytes; None for any other layout (the caller then asks zarr)."""
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    codecs = meta.get("codecs", [])
    if meta.get("data_type") != "int16" or meta.get("shape") != grid or len(codecs) != 2:
        return None
    serializer, compressor = codecs
    if serializer.get("name") != "bytes" or serializer.get("configuration", {}).get("endian") != "little":
        return None
    codec = {"blosc": numcodecs.Blosc, "zstd": numcodecs.Zstd}.get(compressor.get("name"))
    if codec is None:
        return None
    out = np.empty(grid, "<i2")
    codec().decode(blob, out=out)  # both codecs carry their parameters in the stream
    return out


class SiteStore:
    """One site's store. Cheap to construct; safe to use from many Ray tasks at once."""

    def __init__(self, uri: str, storage: StorageConfig | None = None, options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.storage = storage
        # Resolved options can be passed in so that workers need not see the environment.
        if options is None:
            options = storage_options(storage) if is_remote(self.uri) else {}
        self._options = options
        self.fs, self.root = filesystem(self.uri, options=options)
        self._objects: S3Objects | None = None  # the fast GET client, made on the first read

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_objects": None}  # a client stays in its process

    def _get(self, paths: list[str]) -> list:
        """Whole objects (bytes-like): obstore for s3://, fsspec for everything else."""
        if self.uri.startswith("s3://"):
            self._objects = self._objects or S3Objects(self.root.split("/", 1)[0], self._options)
            return [self._objects.get(p) for p in paths]
        blobs = self.fs.cat(paths, on_error="raise")
        return [blobs[p] for p in paths]

    # -- zarr ---------------------------------------------------------------------------------
    def _zarr_store(self, read_only: bool = False):
        if is_local(self.fs):
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.uri, storage_options=self._options, read_only=read_only)

    def init(self, site: str) -> None:
        """Create the root group if the store is new; refuse a store of another site."""
        attrs = self.attrs()
        if attrs is None:
            zarr.open_group(
                self._zarr_store(),
                mode="a",
                zarr_format=3,
                attributes={
                    "format": STORE_FORMAT,
                    "site": site,
                    "ingest_version": INGEST_VERSION,
                },
            )
        elif attrs.get("site") != site:
            raise ValueError(f"store {self.uri} belongs to site {attrs.get('site')!r}, not {site!r}")

    def attrs(self) -> dict | None:
        if not self.fs.exists(join(self.root, "zarr.json")):
            return None
        return dict(zarr.open_group(self._zarr_store(read_only=True), mode="r").attrs)

    def write_volume(self, scan_id: str, volume: np.ndarray, affine: np.ndarray, cfg: StoreConfig) -> str:
        """Write one volume as a single-chunk array (overwriting leftovers); returns its checksum."""
        digest = checksum(volume)
        zarr.create_array(
            self._zarr_store(),
            name=f"volumes/{scan_id}",
            data=np.ascontiguousarray(volume, dtype="<i2"),
            chunks=volume.shape,
            compressors=_compressor(cfg),
            overwrite=True,
            attributes={"affine": np.asarray(affine, float).tolist(), "sha256": digest},
            dimension_names=("R", "A", "S"),
        )
        if cfg.verify_writes and checksum(self.read_volume(scan_id)) != digest:
            raise OSError(f"{self.uri}: volume {scan_id} read back with a different checksum")
        return digest

    def read_volume(self, scan_id: str, verify: bool = False) -> np.ndarray:
        """The stored volume, fetched as two whole objects, its metadata and its one chunk, and
        decoded here (zarr's own read path costs about twice as much); zarr decodes any other layout."""
        base = join(self.root, "volumes", scan_id)
        try:
            meta, chunk = self._get([join(base, "zarr.json"), join(base, "c", "0", "0", "0")])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri}: no stored volume {scan_id}") from err
        except Exception as err:  # obstore / fsspec, after their own retries of transient errors
            raise StorageError(f"store {self.uri}: reading {scan_id}: {type(err).__name__}: {err}") from err
        meta = json.loads(bytes(meta))
        volume = _decode_single_chunk(meta, chunk)
        if volume is None:
            arr = zarr.open_array(self._zarr_store(read_only=True), path=f"volumes/{scan_id}", mode="r")
            volume = arr[...]
        if verify and checksum(volume) != meta["attributes"]["sha256"]:
            raise OSError(f"{self.uri}: volume {scan_id} fails its checksum")
        return volume

    def affine(self, scan_id: str, mask: str | None = None) -> np.ndarray:
        """The stored volume's voxel -> RAS mm affine (its metadata only), or that of its mask
        `mask` (the same grid)."""
        path = (
            join(self.root, "volumes", scan_id) if mask is None else join(self.root, "masks", mask, scan_id)
        )
        try:
            (meta,) = self._get([join(path, "zarr.json")])
        except FileNotFoundError as err:
            what = "stored volume" if mask is None else f"mask {mask!r} of"
            raise FileNotFoundError(f"{self.uri}: no {what} {scan_id}") from err
        return np.asarray(json.loads(bytes(meta))["attributes"]["affine"], dtype=np.float64)

    def write_mask(self, scan_id: str, name: str, mask: np.ndarray, affine: np.ndarray) -> None:
        """Write a label volume (uint8, one label per voxel) aligned with the scan's stored volume,
        as one single-chunk array beside it: `masks/<name>/<scan_id>`."""
        zarr.create_array(
            self._zarr_store(),
            name=f"masks/{name}/{scan_id}",
            data=np.ascontiguousarray(mask, dtype=np.uint8),
            chunks=mask.shape,
            compressors=ZstdCodec(level=3),
            overwrite=True,
            attributes={"affine": np.asarray(affine, float).tolist()},
            dimension_names=("R", "A", "S"),
        )

    def read_mask(self, scan_id: str, name: str) -> np.ndarray:
        """The label volume `name` of a scan (`write_mask`)."""
        try:
            arr = zarr.open_array(self._zarr_store(read_only=True), path=f"masks/{name}/{scan_id}", mode="r")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri}: no mask {name!r} of scan {scan_id}") from err
        return arr[...]

    # -- manifest rows ------------------------------------------------------------------------
    def _row_path(self, scan_id: str) -> str:
        return join(self.root, "_rows", f"{scan_id}.json")

    def commit(self, row: dict[str, Any]) -> None:
        atomic_write(self.fs, self._row_path(row["scan_id"]), json.dumps(row).encode())

    def committed_ids(self) -> set[str]:
        """The committed scans, listed afresh (s3fs caches listings, and other processes commit)."""
        try:
            listing = self.fs.ls(join(self.root, "_rows"), detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        names = (p.rsplit("/", 1)[-1] for p in listing)
        return {n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")}

    def consolidate(self, select: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
        """Rebuild manifest.parquet from the committed rows (only new rows are fetched); a row's
        `slice_ids` (DICOM slices' keyed SOP instance ids) go to slices.parquet (scan_id, slice_id).
        `select` adds the series-selection columns (`fmct_ray.ingest.series.select_primary`)."""
        ids = self.committed_ids()
        old = self.manifest() if self.fs.exists(join(self.root, "manifest.parquet")) else None
        known = set(old["scan_id"]) & ids if old is not None else set()
        new_paths = [self._row_path(i) for i in sorted(ids - known)]
        blobs = self.fs.cat(new_paths) if new_paths else {}
        rows = [json.loads(blobs[p]) for p in new_paths]
        slices = [self.slices()] if known else []
        slices = [s[s["scan_id"].isin(known)] for s in slices]
        slices += [
            pd.DataFrame({"scan_id": r["scan_id"], "slice_id": r.pop("slice_ids", None) or []}) for r in rows
        ]
        kept = old[old["scan_id"].isin(known)] if old is not None else None
        manifest = _concat([kept, pd.DataFrame(rows) if rows else None], {"scan_id": []})
        manifest = manifest.drop(columns=["primary", "primary_reason"], errors="ignore")
        manifest = manifest.sort_values("scan_id", ignore_index=True)
        if "scan_time" in manifest.columns:  # ISO text in the JSON rows -> a timestamp column (NaT: none)
            manifest["scan_time"] = pd.to_datetime(manifest["scan_time"], format="ISO8601")
        if select is not None:
            manifest = select(manifest)
        slices = _concat(slices, {"scan_id": [], "slice_id": []})
        self._write_parquet(
            "slices.parquet", slices.sort_values(["scan_id"], kind="stable", ignore_index=True)
        )
        self._write_parquet("manifest.parquet", manifest)
        return manifest

    def manifest(self) -> pd.DataFrame:
        return self._read_parquet("manifest.parquet")

    def slices(self) -> pd.DataFrame:
        """scan_id, slice_id (keyed SOPInstanceUID) of every DICOM slice of the committed scans."""
        if not self.fs.exists(join(self.root, "slices.parquet")):
            return pd.DataFrame({"scan_id": pd.Series(dtype=object), "slice_id": pd.Series(dtype=object)})
        return self._read_parquet("slices.parquet")

    def write_quarantine(self, rows: list[dict[str, str]]) -> None:
        self._write_parquet("quarantine.parquet", pd.DataFrame(rows, columns=["path", "reason"]))

    def quarantine(self) -> pd.DataFrame:
        return self._read_parquet("quarantine.parquet")

    def _write_parquet(self, name: str, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        atomic_write(self.fs, join(self.root, name), buf.getvalue())

    def _read_parquet(self, name: str) -> pd.DataFrame:
        with self.fs.open(join(self.root, name), "rb") as f:
            return pd.read_parquet(f)

    def write_text(self, relpath: str, text: str) -> None:
        atomic_write(self.fs, join(self.root, relpath), text.encode())


def _concat(frames: list, empty: dict) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(empty)


def load_volume(
    store_uri: str, scan_id: str, storage: StorageConfig | None = None, verify: bool = False
) -> np.ndarray:
    """The stored int16 HU volume (RAS, 1 mm) of `scan_id` as a numpy array."""
    return SiteStore(store_uri, storage).read_volume(scan_id, verify=verify)
