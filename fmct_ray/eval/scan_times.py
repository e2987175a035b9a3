"""Scan times for EHR labels: reading time columns, the scans' times, and the EHR time shift.

Ingest stores each scan's time date-shifted by its patient's offset (`fmct_ray.ingest.privacy`), and
records with it the bound (`date_shift_days`, 0 = real time) and a `secret_check`. To compare EHR
times with those scan times, each EHR record is moved by the same offset: keyed with the site
secret, which must be the one ingest used (checked). A scan-times table can override the manifest's
times with real ones (stores without times, e.g. NIfTI-only sites); the EHR times of those scans stay
unshifted. Every time is a naive local time; unreadable or time-zoned values are errors that name
the file.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from fmct_ray.ingest.privacy import date_shift_days, secret_check, site_secret


def parse_times(values: pd.Series, what: str, column: str) -> pd.Series:
    """Naive timestamps (empty cells -> NaT); unreadable or time-zoned values are errors naming `what`."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        if values.notna().any():
            raise ValueError(f"{what}: column {column!r} holds numbers, expected dates or date-times")
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[us]")
    empty = values.isna() | (values.astype(str).str.strip() == "")
    zoned = ValueError(
        f"{what}: column {column!r}: times carry a time zone; give local times without one, "
        "like the scanners' DICOM times"
    )
    try:
        with warnings.catch_warnings():  # "could not infer format": the per-element parse is fine here
            warnings.filterwarnings("ignore", "Could not infer format", UserWarning)
            out = pd.to_datetime(values.where(~empty), errors="coerce")  # fast path: one inferred format
        retry = out.isna() & ~empty
        if retry.any() and not isinstance(out.dtype, pd.DatetimeTZDtype):  # other formats: one by one
            again = pd.to_datetime(values[retry], errors="coerce", format="mixed")
            if again.dtype.kind != "M" or isinstance(again.dtype, pd.DatetimeTZDtype):
                raise zoned
            out[retry] = again
    except (TypeError, ValueError) as err:  # e.g. mixed time zones
        if err is zoned:
            raise
        raise ValueError(f"{what}: column {column!r}: cannot read the times ({err})") from err
    if isinstance(out.dtype, pd.DatetimeTZDtype):
        raise zoned
    bad = (out.isna() & ~empty).to_numpy()
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"{what}: column {column!r}: {int(bad.sum())} unreadable time(s), the first in data row "
            f"{first + 1}: {values.iloc[first]!r}"
        )
    return out


def ehr_shift_days(scans: pd.DataFrame, secret_env: str) -> np.ndarray:
    """Per scan row: the date shift (days) its stored time carries, to apply to the EHR times too.

    Rows with `date_shift_days` > 0 were shifted by ingest: their shift needs the site secret (from
    `secret_env`), checked against the rows' `secret_check`. Other rows: 0.
    """
    if "date_shift_days" not in scans.columns:
        return np.zeros(len(scans), dtype=np.int64)
    bound = pd.to_numeric(scans["date_shift_days"], errors="coerce").fillna(0).astype(int).to_numpy()
    if not (bound > 0).any():
        return np.zeros(len(scans), dtype=np.int64)
    secret = site_secret(secret_env, "scan times stored date-shifted")
    if "secret_check" in scans.columns:
        checks = set(scans.loc[bound > 0, "secret_check"].dropna())
        if checks - {secret_check(secret)}:
            raise ValueError(
                f"the secret in ${secret_env} is not the one the store's scan times were "
                "date-shifted with (secret_check differs): EHR times cannot be shifted to match"
            )
    keys = list(zip(scans["patient_id"].astype(str), bound.tolist(), strict=True))
    days = {k: date_shift_days(secret, *k) for k in set(keys)}
    return np.asarray([days[k] for k in keys], dtype=np.int64)


def scan_table(
    manifest: pd.DataFrame, times: pd.DataFrame | None = None, what: str = "scan times"
) -> pd.DataFrame:
    """scan_id, patient_id, scan_time, date_shift_days, secret_check of every manifest scan.

    Args:
        manifest: the stores' manifests; their `scan_time` is date-shifted by ingest (their
            `date_shift_days` > 0).
        times: optional scan-times table (scan_id, scan_time) of real times: a time in it overrides
            the manifest's, with date_shift_days 0 (the EHR times of that scan stay unshifted).
        what: name of the times table in error messages.
    """
    scans = manifest[["scan_id", "patient_id"]].copy()
    if "scan_time" in manifest.columns:
        scans["scan_time"] = parse_times(manifest["scan_time"], "manifest", "scan_time")
        scans["date_shift_days"] = manifest.get("date_shift_days", pd.Series(0, index=manifest.index))
        scans["secret_check"] = manifest.get("secret_check", pd.Series(None, index=manifest.index))
    elif times is None:
        raise ValueError(
            "EHR labels need scan times: the manifest has no scan_time column (stores ingested before "
            "ingest version 2); give a scan-times table (--scan-times: scan_id, scan_time)"
        )
    else:
        scans = scans.assign(scan_time=pd.NaT, date_shift_days=0, secret_check=None)
    scans["date_shift_days"] = pd.to_numeric(scans["date_shift_days"]).fillna(0).astype(int)
    if times is None:
        return scans
    missing = {"scan_id", "scan_time"} - set(times.columns)
    if missing:
        raise ValueError(f"{what}: missing column(s) {sorted(missing)}; has {list(times.columns)}")
    times = times.assign(scan_time=parse_times(times["scan_time"], what, "scan_time"))
    times = times.dropna(subset=["scan_time"])[["scan_id", "scan_time"]]
    times["scan_id"] = times["scan_id"].astype(str)
    override = scans["scan_id"].isin(set(times["scan_id"]))
    given = scans[override].drop(columns="scan_time").merge(times, on="scan_id")
    given = given.assign(date_shift_days=0, secret_check=None)
    return pd.concat([scans[~override], given], ignore_index=True)
