"""De-identification keyed with the site's secret: pseudonyms and per-patient date shifts.

- `pseudonym`: scan and patient ids are HMAC-SHA256 keyed hashes of the SeriesInstanceUID (or the
  NIfTI path) and of the PatientID: stable for a site, meaningless without its secret.
- `date_shift_days` / `shift_time`: dates are identifiers too (HIPAA Safe Harbor), so every time a
  store holds is moved by a whole number of days that depends only on the site's secret and the
  pseudonymous patient id (the usual "date shifting" of de-identified research data). All times of
  one patient move together, so intervals within a patient (a 90-day label window, the order of
  scans and diagnoses) are kept exactly; the time of day is kept too. The label code shifts the EHR
  table's times by the same offset before comparing them with the stored scan times.
- `site_secret`: the secret itself, from the environment variable the config names.
- `secret_check`: a keyed hash of a constant, stored with the shifted times, that lets later jobs
  check they hold the secret the times were shifted with (a wrong one would shift silently wrong).

Pure Python with no Ray import: ingest (inside Ray tasks) and `fmct_ray.eval.labels` (which must not
import Ray) share these functions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import datetime, timedelta


def site_secret(secret_env: str, why: str) -> bytes:
    """The site's secret from `$secret_env`; a ValueError saying `why` it is needed if unset."""
    secret = os.environ.get(secret_env)
    if not secret:
        raise ValueError(
            f"{why} need the site secret in ${secret_env} (a long random string kept by the site, "
            "the same for every ingest and labels run of that site)"
        )
    return secret.encode()


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """Keyed hash: stable for a site, meaningless without its secret."""
    return hmac.new(secret, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:24]


def date_shift_days(secret: bytes, patient_id: str, max_days: int) -> int:
    """The patient's date shift: a whole number of days in [-max_days, -1] or [1, max_days].

    Zero is excluded when shifting is on, so no patient keeps its real dates by chance;
    `max_days == 0` turns shifting off (returns 0).

    Args:
        secret: the site's pseudonymisation secret.
        patient_id: the pseudonymous patient id (as in the manifest).
        max_days: bound of the shift (`IngestConfig.date_shift_days`).
    """
    if max_days < 0:
        raise ValueError(f"max_days must be >= 0, got {max_days}")
    if max_days == 0:
        return 0
    k = int(pseudonym(secret, "date-shift", patient_id), 16) % (2 * max_days)  # 96 bits: no visible bias
    return k - max_days if k < max_days else k - max_days + 1


def shift_time(time: datetime | None, secret: bytes, patient_id: str, max_days: int) -> datetime | None:
    """`time` moved by the patient's date shift (None stays None)."""
    if time is None:
        return None
    return time + timedelta(days=date_shift_days(secret, patient_id, max_days))


def secret_check(secret: bytes) -> str:
    """A keyed hash of a constant: equal for equal secrets, reveals nothing about the secret."""
    return pseudonym(secret, "secret-check", "fmct_ray")[:12]
