"""Ingest: NIfTI/DICOM -> HU -> RAS, 1 mm, int16, 224^3 -> one Zarr v3 store per site."""

from fmct_ray.ingest.store import SiteStore, load_volume

__all__ = ["SiteStore", "load_volume"]
