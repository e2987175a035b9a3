"""Scan time of a DICOM series from its headers (DA/TM parsing and the fallback order).

AcquisitionDate + AcquisitionTime, else SeriesDate + SeriesTime, else StudyDate + StudyTime: the
first of these levels that any slice of the series has, the earliest over the slices that have it
(acquisition times differ from slice to slice). A date without a readable time means midnight; an
unreadable date makes the level absent. Times are naive local times, as DICOM writes them.

These times are identifying (a date is a HIPAA identifier): readers keep them out of `RawScan.meta`,
and ingest writes them only date-shifted (`fmct_ray.ingest.privacy.shift_time`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

LEVELS = (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"))
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # YYYYMMDD; YYYY.MM.DD in old ACR-NEMA files
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")  # HH[MM[SS[.F]]]; HH:MM:SS


def dicom_datetime(date: Any, time: Any) -> datetime | None:
    """A DICOM DA + TM pair as a naive datetime: None without a valid date, midnight without a
    valid time."""
    d = _DA.fullmatch(str(date or "").strip())
    if not d:
        return None
    try:
        day = datetime(int(d[1]), int(d[2]), int(d[3]))
    except ValueError:  # month 13, day 0, ...
        return None
    t = _TM.fullmatch(str(time or "").strip())
    if not t:
        return day
    try:
        micro = int((t[4] or "0").ljust(6, "0"))
        return day.replace(hour=int(t[1]), minute=int(t[2] or 0), second=int(t[3] or 0), microsecond=micro)
    except ValueError:  # hour 24, second 60
        return day


def header_times(ds: Any) -> tuple[datetime | None, ...]:
    """(acquisition, series, study) datetime of one slice's dataset, None where absent."""
    return tuple(dicom_datetime(ds.get(d), ds.get(t)) for d, t in LEVELS)


def series_time(headers: list[dict[str, Any]]) -> datetime | None:
    """Scan time of a series: the first level (acquisition, series, study) any slice has, earliest
    over the slices."""
    for level in range(len(LEVELS)):
        times = [h["times"][level] for h in headers if h.get("times") and h["times"][level]]
        if times:
            return min(times)
    return None
