"""Series selection: one `primary` series per study, for downstream runs and study-level labels.

A head-CT study usually holds several series of one acquisition: thin and thick reconstructions,
soft-tissue and bone kernels, sometimes a scout. Study-level labels (CQ500's reads) describe the
study, so they are joined to one series of it; fine-tuning and probes use that series too, while
pretraining may use every series (`DataConfig.series`).

The policy (`SeriesSelection`, part of the ingest config) ranks the series of a study by, in order:
not excluded (bone or lung kernels, scouts: patterns on the SeriesDescription or the
ConvolutionKernel), slice thickness inside a range, preferred (patterns: soft-tissue kernels,
plain / non-contrast), then the most slices. Ingest matches the patterns when it reads a series and
stores only the outcome (`series_excluded`, `series_preferred`: descriptions are free text and may
identify), and `select_primary` ranks the manifest when it is consolidated, writing `primary` and a
`primary_reason` that says what decided. NIfTI scans carry no study: each is its own study.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class SeriesSelection:
    """How the primary series of a study is chosen (case-insensitive regexes, searched anywhere in
    the SeriesDescription and the ConvolutionKernel).

    Args:
        exclude: series never chosen while the study has another one (bone, lung, sharp kernels,
            scouts).
        prefer: series chosen over the others that pass the first two steps.
        thickness_mm: slice-thickness range of the candidates (a series without SliceThickness is
            inside).
    """

    exclude: tuple[str, ...] = (
        r"bone",
        r"lung",
        r"sharp",
        r"scout",
        r"localizer",
        r"topogram",
        r"\b[BHJ]r?[6-9]\d",  # Siemens bone / sharp kernels (B70, H60s, Hr64)
    )
    prefer: tuple[str, ...] = (
        r"soft",
        r"standard",
        r"brain",
        r"plain",
        r"non[- ]?contrast",
        r"\b[BHJ]r?[1-4]\d",
    )
    thickness_mm: tuple[float, float] = (0.5, 5.0)

    def __post_init__(self) -> None:
        for pattern in (*self.exclude, *self.prefer):
            re.compile(pattern)
        if self.thickness_mm[0] > self.thickness_mm[1]:
            raise ValueError(f"thickness_mm: lower bound above upper bound in {self.thickness_mm}")

    def flags(self, description: str | None, kernel: str | None) -> dict[str, bool]:
        """The manifest's `series_excluded` and `series_preferred` of one series."""
        text = " ".join(t for t in (description, kernel) if t)

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(re.search(p, text, re.IGNORECASE) for p in patterns)

        return {"series_excluded": hit(self.exclude), "series_preferred": hit(self.prefer)}


def select_primary(manifest: pd.DataFrame, policy: SeriesSelection) -> pd.DataFrame:
    """`manifest` with `primary` (one True per study) and `primary_reason` (on every row)."""
    if manifest.empty:
        return manifest.assign(primary=pd.Series(dtype=bool), primary_reason=pd.Series(dtype=object))
    m = manifest.copy()
    study = m["study_id"] if "study_id" in m.columns else pd.Series(None, index=m.index, dtype=object)
    study = study.where(study.notna(), m["scan_id"])
    excluded = _flag(m, "series_excluded")
    preferred = _flag(m, "series_preferred")
    thickness = _number(m, "slice_thickness")
    lo, hi = policy.thickness_mm
    in_range = thickness.isna() | thickness.between(lo, hi)
    slices = _number(m, "n_slices").fillna(0).astype(int)
    m["primary"], m["primary_reason"] = False, ""
    for _, rows in m.groupby(study, sort=False).groups.items():
        rank = sorted(
            rows,
            key=lambda i: (excluded[i], not in_range[i], not preferred[i], -slices[i], m.at[i, "scan_id"]),
        )
        best = rank[0]
        m.loc[rows, "primary_reason"] = (
            f"not chosen: series {m.at[best, 'scan_id'][:12]} is the study's primary"
        )
        m.at[best, "primary"] = True
        m.at[best, "primary_reason"] = _reason(best, rows, excluded, in_range, preferred, slices, policy)
    return m


def _number(m: pd.DataFrame, column: str) -> pd.Series:
    """A numeric column; all missing where the manifest lacks it (rows of an older ingest)."""
    values = m[column] if column in m.columns else pd.Series(None, index=m.index, dtype=float)
    return pd.to_numeric(values, errors="coerce")


def _flag(m: pd.DataFrame, column: str) -> pd.Series:
    return m[column].fillna(False).astype(bool) if column in m.columns else pd.Series(False, index=m.index)


def _reason(best, rows, excluded, in_range, preferred, slices, policy) -> str:
    """What decided, step by step, among the series still tied with the chosen one."""
    if len(rows) == 1:
        return "the only series of its study"
    lo, hi = policy.thickness_mm
    said, rest = [f"{len(rows)} series"], [i for i in rows if i != best]
    if excluded[best]:
        said.append("every series matches an exclude pattern")
    steps = (
        (excluded, "{} excluded by pattern"),
        (in_range, f"{{}} outside {lo:g}-{hi:g} mm"),
        (preferred, "{} not matching a prefer pattern"),
    )
    for flag, text in steps:
        beaten = [i for i in rest if flag[i] != flag[best]]
        if beaten:
            said.append(text.format(len(beaten)))
        rest = [i for i in rest if flag[i] == flag[best]]
    if rest:
        said.append(f"most slices ({slices[best]} vs {max(slices[i] for i in rest)})")
    return "; ".join(said)
