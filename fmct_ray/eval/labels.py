"""Task labels per scan: derived from health records, or joined from public-dataset label files.

Two sources (issue 5, SPEC section 4):

- EHR: a table of (patient_id, time, code) rows, where `code` is an ICD-10 code or a drug name
  (an optional `kind` column, "diagnosis" / "medication", keeps the two apart), and the scan times
  of the manifest's `scan_time` column. A scan is positive for a task if any code or medication of
  the task's definition (`configs/labels/*.yaml`) appears in the patient's records in
  [scan_time, scan_time + window_days). Codes are compared without dots and case ("I61.0" ==
  "i610"); "I60.*" matches every code starting with I60; medications match as whole words
  ("Donepezil 10 mg tablet" matches donepezil). Derived tasks (`include`) union the definitions of
  other tasks.
  Ingest stores scan times date-shifted per patient (`fmct_ray.ingest.privacy`), so the EHR times
  of each patient are moved by the same shift (keyed with the site secret, checked against the
  manifest's `secret_check`) before the comparison; intervals, hence labels, are unchanged. A
  scan-times table (scan_id, scan_time) can override the manifest's times (stores without times,
  e.g. NIfTI-only sites): those times are real ones, and the EHR times of those scans stay unshifted.
- Public label files: one row per labelled thing, one column per task, joined to the manifest by
  scan id, or by the pseudonym of the original NIfTI path / DICOM series / DICOM slice / patient,
  computed with the site's secret exactly as ingest computed it. Two published layouts are read
  as they are:
  RSNA 2019 (`layout: rsna2019`): `ID,Label` with six rows per slice (`ID_<hex>_<subtype>`),
  joined through the slices' SOP instance ids (`id_kind: dicom_slice`, the store's slices.parquet);
  a series is positive for a subtype when any of its slices is, negative when every slice is
  labelled and none is positive, and missing otherwise.
  CQ500 (`readers: [R1, R2, R3]`): `name`, then one `R<k>:<task>` column per reader; the label is
  the majority (or any, or all) of the reads, per patient (`id_kind: patient`), and goes to the
  primary series of the patient's study (`fmct_ray.ingest.series`); other series stay missing.

Besides binary tasks, a label file can carry typed targets (`TaskDefinition.kind`): continuous
values (one float column), survival (`<task>_time`, `<task>_event`) and points (`<task>_{x,y,z}_mm`
in the stored frame: voxel index x 1 mm; points given in the scan's own RAS or LPS world
coordinates are mapped there through the stored volume's affine, as ingest mapped the scan).
Masks are label volumes in the stores (ingest, `IngestConfig.masks`), not columns.

Labels are nullable (pandas "Int8": 1, 0, <NA>; typed targets: float, NaN). A label is missing,
never silently negative, when the scan has no time, the patient has no records at all, the file
has no row or an empty cell for it, its value is invalid, or it is contradictory (two rows that
disagree, a derived task negative while a task it includes is positive). `LabelReport` counts
every such case per task with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fmct_ray.eval.scan_times import ehr_shift_days, parse_times, scan_table
from fmct_ray.eval.tables import markdown_table
from fmct_ray.ingest.privacy import pseudonym, site_secret

TRUE = {"1", "1.0", "true", "yes", "y", "positive", "pos", "t"}
FALSE = {"0", "0.0", "false", "no", "n", "negative", "neg", "f"}
CONTRADICTED = -2.0  # the value of rows that disagree (RSNA: one slice and subtype listed twice)


Kind = Literal["binary", "continuous", "survival", "point"]
SUFFIXES: dict[str, tuple[str, ...]] = {  # the label table's columns of a task, after its name
    "binary": ("",),
    "continuous": ("",),
    "survival": ("_time", "_event"),
    "point": ("_x_mm", "_y_mm", "_z_mm"),
}


@dataclass(frozen=True)
class TaskDefinition:
    """One task: binary (from EHR codes or a label file), or a typed target of a label file.

    Args:
        codes: ICD-10 codes; a trailing `*` makes the code a prefix.
        medications: drug names (case-insensitive whole words).
        include: other tasks whose definitions are unioned in (ICH = IPH + IVH + ...).
        column: the column of a public label file holding this task (None: the task name);
            binary and continuous tasks.
        kind: binary, continuous (a number), survival (time >= 0 and event) or point (x, y, z mm).
        columns: the label file's columns of a survival (time, event) or point (x, y, z) task.
        frame: where a point's coordinates are: "stored" (voxel index x 1 mm of the stored
            volume), or the scan's own world frame in mm, "ras" (NIfTI) or "lps" (DICOM patient
            coordinates).
    """

    codes: tuple[str, ...] = ()
    medications: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    column: str | None = None
    kind: Kind = "binary"
    columns: tuple[str, ...] = ()
    frame: Literal["stored", "ras", "lps"] = "stored"

    def sources(self, name: str) -> list[str]:
        """The label file's columns of the task."""
        return list(self.columns) if self.kind in ("survival", "point") else [self.column or name]


def task_columns(name: str, task: TaskDefinition) -> list[str]:
    """The label table's columns of a task."""
    return [name + suffix for suffix in SUFFIXES[task.kind]]


@dataclass(frozen=True)
class LabelConfig:
    """Root config of `configs/labels/*.yaml`.

    Args:
        tasks: task name -> definition.
        window_days: EHR window length; records in [scan, scan + window_days) count.
        subcodes: also match codes that extend a listed code (S06.5 -> S06.5X0A, ICD-10-CM).
        id_column: the scan identifier column of a public label file.
        id_kind: what that column holds: the pseudonymous scan id, the NIfTI path relative to the
            ingest input root, the DICOM SeriesInstanceUID, a slice's SOPInstanceUID (labels per
            slice, aggregated per series) or the PatientID (labels per study, given to its primary
            series); all but the first are hashed with the site secret.
        id_strip: characters removed from the file's ids before hashing (a copy whose PatientID
            is written without the hyphens of the label file's names: "-").
        layout: "wide" (one column per task) or "rsna2019" (`ID,Label` rows, ID = <id>_<column>).
        readers: reader prefixes of multi-reader files (CQ500: R1, R2, R3): a task's value is
            combined from the columns `<reader>:<column>`.
        combine: how the readers' values combine: majority (ties missing), any, all.
        patient_ids: whether the EHR's patient ids are already pseudonymous or raw (then hashed).
        secret_env: environment variable with the site secret (only for raw ids).
    """

    tasks: dict[str, TaskDefinition] = field(default_factory=dict)
    window_days: int = 90
    subcodes: bool = False
    id_column: str = "scan_id"
    id_kind: Literal["scan_id", "nifti_path", "dicom_series", "dicom_slice", "patient"] = "scan_id"
    id_strip: str = ""
    layout: Literal["wide", "rsna2019"] = "wide"
    readers: tuple[str, ...] = ()
    combine: Literal["majority", "any", "all"] = "majority"
    patient_ids: Literal["pseudonymous", "raw"] = "pseudonymous"
    secret_env: str = "FMCT_SITE_SECRET"

    def __post_init__(self) -> None:
        if self.window_days <= 0:
            raise ValueError(f"window_days must be positive, got {self.window_days}")
        for name, task in self.tasks.items():
            unknown = set(task.include) - set(self.tasks)
            if unknown:
                raise ValueError(f"task {name} includes unknown task(s) {sorted(unknown)}")
            typed = [t for t in task.include if self.tasks[t].kind != "binary"]
            if typed:
                raise ValueError(f"task {name} includes non-binary task(s) {typed}")
        for name in self.tasks:
            expand(self, name)  # raises on include cycles
        if self.layout == "rsna2019" and self.id_kind != "dicom_slice":
            raise ValueError("layout rsna2019 labels slices: use id_kind: dicom_slice")
        for name, task in self.tasks.items():
            if task.kind == "binary":
                continue
            if task.codes or task.medications or task.include:
                raise ValueError(f"task {name}: a {task.kind} target comes from a label file, not codes")
            need = len(SUFFIXES[task.kind]) if task.kind != "continuous" else 0
            if len(task.columns) != need:
                raise ValueError(f"task {name}: a {task.kind} task names {need} label-file columns")
            if self.layout != "wide" or self.readers or self.id_kind in ("dicom_slice", "patient"):
                raise ValueError(
                    f"task {name}: {task.kind} targets are read per scan from a wide label file "
                    "(no readers; id_kind scan_id, nifti_path or dicom_series)"
                )


def expand(cfg: LabelConfig, task: str, seen: tuple[str, ...] = ()) -> tuple[set[str], set[str]]:
    """(codes, medications) of `task` with its includes resolved."""
    if task in seen:
        raise ValueError(f"task definitions include each other in a cycle: {' -> '.join((*seen, task))}")
    d = cfg.tasks[task]
    codes, meds = set(d.codes), {m.lower() for m in d.medications}
    for other in d.include:
        c, m = expand(cfg, other, (*seen, task))
        codes |= c
        meds |= m
    return codes, meds


@dataclass
class LabelReport:
    """Per task: counts of positives, negatives, missing and contradictory labels, and why."""

    rows: list[dict] = field(default_factory=list)

    def add(self, task: str, reason: str, count: int) -> None:
        if count:
            self.rows.append({"task": task, "reason": reason, "scans": int(count)})

    def table(self, labels: pd.DataFrame, tasks: dict[str, TaskDefinition]) -> pd.DataFrame:
        """One row per task: its kind, scans, labelled (binary: positive, negative), missing, and
        the reasons of the missing."""
        out = []
        for t, d in tasks.items():
            missing = labels[task_columns(t, d)].isna().any(axis=1)
            col = labels[t] if d.kind == "binary" else None
            out.append(
                {
                    "task": t,
                    "kind": d.kind,
                    "scans": len(labels),
                    "labelled": int((~missing).sum()),
                    "positive": pd.NA if col is None else int((col == 1).sum()),
                    "negative": pd.NA if col is None else int((col == 0).sum()),
                    "missing": int(missing.sum()),
                    "reasons": "; ".join(f"{r['reason']}: {r['scans']}" for r in self.rows if r["task"] == t),
                }
            )
        return pd.DataFrame(out)


# -- EHR ------------------------------------------------------------------------------------------
def normalise_code(code: str) -> str:
    return str(code).strip().upper().replace(".", "")


def code_matcher(codes: set[str], subcodes: bool) -> re.Pattern:
    """One regex over normalised codes: prefixes for `X*` (and for all codes when `subcodes`)."""
    parts = []
    for c in sorted(codes):
        prefix = c.endswith("*")
        body = re.escape(normalise_code(c.rstrip("*")))
        parts.append(body + (".*" if prefix or subcodes else ""))
    return re.compile("^(?:" + "|".join(parts) + ")$") if parts else re.compile("(?!)")


def medication_matcher(meds: set[str]) -> re.Pattern:
    if not meds:
        return re.compile("(?!)")
    return re.compile(r"\b(?:" + "|".join(re.escape(m) for m in sorted(meds)) + r")\b", re.IGNORECASE)


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; has {list(frame.columns)}")


def _secret(cfg: LabelConfig) -> bytes:
    return site_secret(cfg.secret_env, "raw ids")


def derive_ehr_labels(
    ehr: pd.DataFrame, scans: pd.DataFrame, cfg: LabelConfig, what: str = "EHR table"
) -> tuple[pd.DataFrame, LabelReport]:
    """One nullable binary column per task for every scan.

    Args:
        ehr: columns patient_id, time, code (ICD-10 code or drug name), optional kind.
        scans: columns scan_id, patient_id, scan_time (manifest joined with the scan times);
            optional date_shift_days (> 0: the time is stored date-shifted, so each EHR time is
            shifted by the patient's offset for this scan) and secret_check (see `scan_table`).
        cfg: task definitions and window.
        what: name of the EHR source in error messages.
    """
    _require(ehr, ["patient_id", "time", "code"], what)
    typed = [t for t, d in cfg.tasks.items() if d.kind != "binary"]
    if typed:
        raise ValueError(f"{what}: health records give binary labels; tasks {typed} need a label file")
    _require(scans, ["scan_id", "patient_id", "scan_time"], "scan table")
    ehr = ehr.copy()
    if cfg.patient_ids == "raw":
        secret = _secret(cfg)
        ehr["patient_id"] = [pseudonym(secret, "patient", str(p)) for p in ehr["patient_id"]]
    ehr["time"] = parse_times(ehr["time"], what, "time")
    if ehr["time"].isna().any():
        raise ValueError(f"{what}: {int(ehr['time'].isna().sum())} record(s) without a time; drop them first")
    kind = ehr["kind"].astype(str).str.lower() if "kind" in ehr.columns else None
    is_dx = kind.str.startswith("diag") if kind is not None else pd.Series(True, index=ehr.index)
    is_med = kind.str.startswith("med") if kind is not None else pd.Series(True, index=ehr.index)
    code = ehr["code"].astype(str)
    scans = scans.reset_index(drop=True).assign(_scan=lambda f: np.arange(len(f)))
    scans["scan_time"] = parse_times(scans["scan_time"], "scan table", "scan_time")
    scans["_shift"] = ehr_shift_days(scans, cfg.secret_env)
    # every (scan, record) pair of the same patient inside the window, the record moved like the scan
    pairs = scans.merge(ehr.assign(_row=np.arange(len(ehr))), on="patient_id", how="inner")
    delta = pairs["time"] + pd.to_timedelta(pairs["_shift"], unit="D") - pairs["scan_time"]
    pairs = pairs[(delta >= pd.Timedelta(0)) & (delta < pd.Timedelta(days=cfg.window_days))]
    rows = pairs["_row"].to_numpy()
    report = LabelReport()
    no_time = scans["scan_time"].isna().to_numpy()
    no_records = ~scans["patient_id"].isin(set(ehr["patient_id"])).to_numpy()
    labels = pd.DataFrame({"scan_id": scans["scan_id"].to_numpy()})
    for task in cfg.tasks:
        codes, meds = expand(cfg, task)
        hit_row = (is_dx & code.map(normalise_code).str.match(code_matcher(codes, cfg.subcodes))) | (
            is_med & code.str.contains(medication_matcher(meds))
        )
        positive = np.zeros(len(scans), dtype=np.int8)  # per scan row: a scan may have two times
        positive[pairs["_scan"].to_numpy()[hit_row.to_numpy()[rows]]] = 1
        col = pd.Series(positive, dtype="Int8")
        col[no_time | no_records] = pd.NA
        labels[task] = col
        report.add(task, "no scan time", no_time.sum())
        report.add(task, "patient has no EHR records", (no_records & ~no_time).sum())
    return _drop_duplicates(labels, list(cfg.tasks), report)


def _collapse(values: pd.Series):
    """The one value of a scan's rows; <NA> when they disagree or are all missing."""
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else pd.NA


def _drop_duplicates(
    labels: pd.DataFrame,
    tasks: list[str],
    report: LabelReport,
    key: str = "scan_id",
    reason: str = "contradictory rows for the same scan",
):
    """One row per `key`: an id listed twice (a scan with two scan times; a slice or patient twice
    in a label file) whose labels disagree is contradictory -> missing, counted under `reason`."""
    dup = labels[key].duplicated(keep=False)
    if not dup.any():
        return labels.reset_index(drop=True), report
    groups = labels[dup].groupby(key, sort=False)
    for t in tasks:
        report.add(t, reason, (groups[t].nunique() > 1).sum())
    out = labels.groupby(key, sort=False)[tasks].agg(_collapse).reset_index()
    for t in tasks:
        out[t] = out[t].astype("Int8")
    return out, report


# -- public label files ---------------------------------------------------------------------------
def _parse_value(v) -> float:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return np.nan
    if v == CONTRADICTED:
        return CONTRADICTED
    text = str(v).strip().lower()
    if text in TRUE:
        return 1.0
    if text in FALSE:
        return 0.0
    if text in ("", "nan", "na", "none", "null"):
        return np.nan
    return -1.0  # invalid


def public_scan_ids(values: pd.Series, cfg: LabelConfig) -> pd.Series:
    """The label file's id column mapped to pseudonymous ids (scan ids; slice or patient ids for
    those kinds)."""
    if cfg.id_kind == "scan_id":
        return values.astype(str)
    secret = _secret(cfg)
    kind, prefix = {
        "nifti_path": ("scan", "nifti:"),
        "dicom_series": ("scan", "dicom:"),
        "dicom_slice": ("slice", ""),
        "patient": ("patient", ""),
    }[cfg.id_kind]
    strip = str.maketrans("", "", cfg.id_strip)
    return values.astype(str).map(lambda v: pseudonym(secret, kind, prefix + v.strip().translate(strip)))


def rsna_wide(table: pd.DataFrame, what: str) -> pd.DataFrame:
    """RSNA 2019's `ID,Label` rows (`ID_<hex>_<subtype>`, six per slice) -> one row per slice id,
    one column per subtype (a slice and subtype listed twice with different labels: `CONTRADICTED`)."""
    _require(table, ["ID", "Label"], what)
    parts = table["ID"].astype(str).str.rpartition("_")
    if (parts[1] == "").any():
        raise ValueError(f"{what}: ID {table['ID'][parts[1] == ''].iloc[0]!r} is not <slice id>_<subtype>")
    long = pd.DataFrame({"ID": parts[0], "subtype": parts[2], "value": table["Label"].map(_parse_value)})
    wide = long.groupby(["ID", "subtype"], sort=False)["value"].agg(
        lambda v: v.iloc[0] if v.nunique(dropna=False) == 1 else CONTRADICTED
    )
    return wide.unstack("subtype").reset_index()


def _values(table: pd.DataFrame, column: str, cfg: LabelConfig) -> np.ndarray:
    """One float per row (1, 0, NaN missing, -1 invalid) of a task's column or its readers'."""
    if not cfg.readers:
        return table[column].map(_parse_value).astype(float).to_numpy()
    reads = np.stack([table[f"{r}:{column}"].map(_parse_value).astype(float) for r in cfg.readers], 1)
    invalid = (reads == -1).any(1)
    reads = np.where(reads == -1, np.nan, reads)
    pos, n = np.nansum(reads, 1), (~np.isnan(reads)).sum(1)
    if cfg.combine == "majority":
        out = np.where(2 * pos > n, 1.0, np.where(2 * pos < n, 0.0, np.nan))
    elif cfg.combine == "any":
        out = np.where(pos > 0, 1.0, np.where(n == len(cfg.readers), 0.0, np.nan))
    else:
        out = np.where(pos == len(cfg.readers), 1.0, np.where(n > pos, 0.0, np.nan))
    return np.where(invalid, -1.0, np.where(n == 0, np.nan, out))


def join_public_labels(
    table: pd.DataFrame,
    manifest: pd.DataFrame,
    cfg: LabelConfig,
    what: str = "label file",
    slices: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, LabelReport]:
    """Labels of every manifest scan from a public label file (see the module docstring).

    Args:
        table: the file as read.
        manifest: the scans to label (scan_id, patient_id; `primary` for id_kind patient).
        cfg: tasks, id column and kind, layout, readers.
        what: the file's name in messages.
        slices: scan_id, slice_id of the stores' DICOM slices (id_kind dicom_slice).
    """
    columns = {t: d.column or t for t, d in cfg.tasks.items() if d.kind == "binary"}
    typed = {t: d for t, d in cfg.tasks.items() if d.kind != "binary"}
    if cfg.layout == "rsna2019":
        table = rsna_wide(table, what)
    needed = [f"{r}:{c}" for c in columns.values() for r in cfg.readers] or list(columns.values())
    _require(table, [cfg.id_column, *needed, *(c for t, d in typed.items() for c in d.sources(t))], what)
    report = LabelReport()
    ids = public_scan_ids(table[cfg.id_column], cfg).to_numpy()
    if cfg.id_kind == "dicom_slice" and (slices is None or slices.empty):
        raise ValueError(f"{what}: labels per slice need the stores' slices.parquet (DICOM ingest)")
    pool = {"dicom_slice": "slice_id", "patient": "patient_id"}.get(cfg.id_kind, "scan_id")
    known = np.isin(ids, list(set((slices if pool == "slice_id" else manifest)[pool])))
    values = {task: _values(table, column, cfg) for task, column in columns.items()}
    for task, column in columns.items():  # counted where the row will be used
        report.add(task, f"invalid value in column {column!r}", ((values[task] == -1) & known).sum())
        contradicted = (values[task] == CONTRADICTED) & known
        report.add(task, "contradictory rows for the same slice", contradicted.sum())
        values[task] = np.where(values[task] >= 0, values[task], np.nan)
    frame = pd.DataFrame({"id": ids, **{t: pd.Series(v).astype("Int8") for t, v in values.items()}})
    if cfg.id_kind == "dicom_slice":
        frame = _per_series(frame, slices, report)
    elif cfg.id_kind == "patient":
        frame = _per_study(frame, manifest, report)
    else:
        frame = frame.rename(columns={"id": "scan_id"})
        for task in columns:
            report.add(task, "empty cell", (frame[task].isna().to_numpy() & known).sum())
            report.add(task, "label rows for scans not in the manifest (ignored)", (~known).sum())
        frame, report = _drop_duplicates(frame[known], list(columns), report)
    for task in columns:
        report.add(task, "no row in the label file", (~manifest["scan_id"].isin(set(frame["scan_id"]))).sum())
    if typed:
        frame = frame.merge(_typed_labels(table, ids, known, typed, report), on="scan_id", how="outer")
    for task in typed:
        report.add(task, "no row in the label file", (~manifest["scan_id"].isin(set(frame["scan_id"]))).sum())
    labels = manifest[["scan_id"]].merge(frame, on="scan_id", how="left")
    for task in columns:
        labels[task] = labels[task].astype("Int8")
    return _check_includes(labels, cfg, report), report


def _number(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values.astype(str).str.strip(), errors="coerce").to_numpy(float)


def _typed_labels(
    table: pd.DataFrame, ids: np.ndarray, known: np.ndarray, tasks: dict[str, TaskDefinition], report
) -> pd.DataFrame:
    """The typed targets of the label file's rows of known scans (scan_id + `task_columns` of each
    task, float): an empty cell or an invalid value (not a number; a negative survival time; an
    event that is not yes/no) makes the task missing for the row, and rows of one scan that
    disagree make it missing for the scan; each counted in `report`."""
    frame = pd.DataFrame({"scan_id": ids})
    for name, d in tasks.items():
        src = d.sources(name)
        cells = table[src]
        empty = (
            (cells.isna() | (cells.astype(str).apply(lambda c: c.str.strip()) == "")).any(axis=1).to_numpy()
        )
        values = np.stack([_number(table[c]) for c in src], 1)
        if d.kind == "survival":
            values[:, 1] = table[src[1]].map(_parse_value).astype(float).to_numpy()
            bad = (values[:, 0] < 0) | ~np.isin(values[:, 1], (0.0, 1.0))
        else:
            bad = np.zeros(len(table), bool)
        invalid = ~empty & (~np.isfinite(values).all(1) | bad)
        report.add(name, "empty cell", (empty & known).sum())
        report.add(name, f"invalid value in column(s) {src}", (invalid & known).sum())
        values[empty | invalid] = np.nan
        frame[task_columns(name, d)] = values
    frame = frame[known]
    groups = frame.groupby("scan_id", sort=False)
    out = groups.first().reset_index()  # every column's first non-missing value; disagreements next
    for name, d in tasks.items():
        cols = task_columns(name, d)
        differ = (groups[cols].nunique() > 1).any(axis=1)
        report.add(name, "contradictory rows for the same scan", differ.sum())
        bad = out["scan_id"].isin(set(differ.index[differ])) | out[cols].isna().any(axis=1)
        out.loc[bad.to_numpy(), cols] = np.nan
    return out


def to_stored_points(labels: pd.DataFrame, tasks: dict[str, TaskDefinition], affine) -> pd.DataFrame:
    """Points given in a scan's world frame (`TaskDefinition.frame` "ras" or "lps", mm) moved to
    the stored frame, through `affine(scan_id)` (the stored volume's voxel -> RAS affine)."""
    from fmct_ray.ingest.geometry import to_stored_frame

    labels = labels.copy()
    for name, d in tasks.items():
        if d.kind != "point" or d.frame == "stored":
            continue
        cols = task_columns(name, d)
        points = labels[cols].to_numpy(float, copy=True)
        if d.frame == "lps":
            points[:, :2] *= -1
        for i in np.flatnonzero(~np.isnan(points).any(1)):
            points[i] = to_stored_frame(points[i], affine(labels["scan_id"].iloc[i]))[0]
        labels[cols] = points
    return labels


def _per_series(rows: pd.DataFrame, slices: pd.DataFrame, report: LabelReport) -> pd.DataFrame:
    """Slice labels (`rows`: id = slice id, one Int8 column per task) -> series labels: any
    positive slice; else negative when every slice of the series is labelled; else missing."""
    tasks = [c for c in rows.columns if c != "id"]
    rows, _ = _drop_duplicates(rows, tasks, report, "id", "slices with contradictory rows")
    known = set(slices["slice_id"])
    merged = slices.merge(rows, left_on="slice_id", right_on="id", how="inner")
    labelled = merged.groupby("scan_id")
    n = slices[slices["scan_id"].isin(set(merged["scan_id"]))].groupby("scan_id").size()
    frame = pd.DataFrame(index=n.index)
    for task in tasks:
        report.add(task, "label rows for slices not in the store (ignored)", (~rows["id"].isin(known)).sum())
        positive = labelled[task].max().reindex(n.index).eq(1).fillna(False).to_numpy(bool)
        complete = labelled[task].count().reindex(n.index).to_numpy() == n.to_numpy()
        frame[task] = np.where(positive, 1.0, np.where(complete, 0.0, np.nan))
        report.add(task, "series with slices unlabelled and none positive", (~positive & ~complete).sum())
    return frame.rename_axis("scan_id").reset_index().astype({t: "Int8" for t in tasks})


def _per_study(rows: pd.DataFrame, manifest: pd.DataFrame, report: LabelReport) -> pd.DataFrame:
    """Patient labels (`rows`: id = patient id, one Int8 column per task) -> the primary series of
    the patient's one study (a patient with several studies cannot be placed: missing)."""
    tasks = [c for c in rows.columns if c != "id"]
    rows, _ = _drop_duplicates(rows, tasks, report, "id", "patients with contradictory rows")
    rows = rows.rename(columns={"id": "patient_id"})
    m = manifest.assign(primary=manifest["primary"] if "primary" in manifest.columns else True)
    studies = m.assign(study=m.get("study_id", m["scan_id"]).fillna(m["scan_id"]))
    n_studies = studies.groupby("patient_id")["study"].nunique()
    primary = m[m["primary"].astype(bool)][["scan_id", "patient_id"]]
    joined = primary.merge(rows, on="patient_id", how="inner")
    several = joined["patient_id"].map(n_studies).fillna(1).to_numpy() > 1
    known = rows["patient_id"].isin(set(m["patient_id"]))
    not_primary = m["patient_id"].isin(set(rows["patient_id"])) & ~m["primary"].astype(bool)
    for task in tasks:
        report.add(task, "label rows for patients not in the manifest (ignored)", (~known).sum())
        report.add(task, "empty or tied reads", (joined[task].isna().to_numpy() & ~several).sum())
        report.add(task, "patient has several studies: the read cannot be placed", several.sum())
        report.add(task, "not the primary series of its study (study-level labels)", not_primary.sum())
        joined.loc[several, task] = pd.NA
    return joined[["scan_id", *tasks]].astype({t: "Int8" for t in tasks})


def _check_includes(labels: pd.DataFrame, cfg: LabelConfig, report: LabelReport) -> pd.DataFrame:
    """A derived task that is negative while a task it includes is positive is contradictory."""
    for task, d in cfg.tasks.items():
        parts = [p for p in d.include if p in labels.columns]
        if not parts:
            continue
        any_part = (labels[parts] == 1).any(axis=1)
        bad = (labels[task] == 0) & any_part
        report.add(task, f"negative while an included task ({', '.join(parts)}) is positive", bad.sum())
        labels.loc[bad.fillna(False).astype(bool), task] = pd.NA
    return labels


# -- files ----------------------------------------------------------------------------------------
def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet table; errors name the file."""
    path = str(path)
    try:
        return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - any unreadable table is a clear user error
        raise ValueError(f"cannot read table {path}: {type(err).__name__}: {err}") from err


def write_labels(labels: pd.DataFrame, report: pd.DataFrame, out: str | Path) -> Path:
    """labels.parquet, label_report.csv and label_report.md in folder `out`; returns the parquet."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels.to_parquet(out / "labels.parquet", index=False)
    report.to_csv(out / "label_report.csv", index=False)
    (out / "label_report.md").write_text(markdown_table(report))
    return out / "labels.parquet"


def label_scans(
    cfg: LabelConfig,
    manifest: pd.DataFrame,
    ehr: str | Path | None = None,
    scan_times: str | Path | None = None,
    public: str | Path | None = None,
    slices: pd.DataFrame | None = None,
    affine=None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels of the manifest's scans from an EHR table (+ the manifest's scan times, or a
    scan-times table that overrides them, see `scan_table`) or a public label file (`slices`:
    the stores' slice ids, for labels per slice; `affine`: scan_id -> stored volume affine, for
    points given in world coordinates).

    Returns (labels: scan_id, patient_id, site, split, one Int8 column per binary task and the
    float columns of typed ones (`task_columns`); the per-task report table).
    """
    if (ehr is None) == (public is None):
        raise ValueError("give exactly one label source: an EHR table or a label file")
    _require(manifest, ["scan_id", "patient_id", "site", "split"], "manifest")
    if ehr is not None:
        times = None if scan_times is None else read_table(scan_times)
        scans = scan_table(manifest, times, str(scan_times))
        labels, report = derive_ehr_labels(read_table(ehr), scans, cfg, what=str(ehr))
    else:
        labels, report = join_public_labels(read_table(public), manifest, cfg, str(public), slices)
    meta = manifest[["scan_id", "patient_id", "site", "split"]].drop_duplicates("scan_id")
    labels = meta.merge(labels, on="scan_id", how="left")
    if any(d.kind == "point" and d.frame != "stored" for d in cfg.tasks.values()):
        if affine is None:
            raise ValueError("points in world coordinates need the stores (their volumes' affines)")
        labels = to_stored_points(labels, cfg.tasks, affine)
    return labels, report.table(labels, cfg.tasks)


def make_labels(
    cfg: LabelConfig, manifest: pd.DataFrame, out: str | Path, **sources
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`label_scans` (the label `sources`: ehr, scan_times, public, slices), written to
    `out`/labels.parquet and the report (CSV, Markdown); returns (labels, report table)."""
    labels, table = label_scans(cfg, manifest, **sources)
    write_labels(labels, table, out)
    return labels, table


def _group_labels(cfg: LabelConfig, sites, sources: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    from fmct_ray.ingest.store import SiteStore

    stores = [SiteStore(s.uri, s.storage) for s in sites]
    manifests = [s.manifest() for s in stores]
    store_of = {scan: store for store, m in zip(stores, manifests) for scan in m["scan_id"]}
    manifest = pd.concat(manifests, ignore_index=True)
    slices = pd.concat([s.slices() for s in stores]) if cfg.id_kind == "dicom_slice" else None
    labels, table = label_scans(
        cfg, manifest, slices=slices, affine=lambda scan: store_of[scan].affine(scan), **sources
    )
    return labels, table.assign(sites=",".join(s.name for s in sites))


def site_labels(cfg: LabelConfig, sites, out: str | Path, **sources) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels of the scans of `sites` (`fmct_ray.sites.SiteSpec`s; label `sources`: ehr,
    scan_times, public), written to `out` as `make_labels` does.

    The sites anyone may read are labelled together, here. Each site pinned to its nodes (a
    `resource`) is labelled on one of them (`fmct_ray.sites.run_on_site`): its manifest, slices and
    label source are read there, and only its pseudonymous label rows and report counts come back.
    The report has one row per task and group of sites labelled together (column `sites`).
    """
    from fmct_ray.sites import run_on_site

    groups = [g for g in [[s for s in sites if not s.resource]] + [[s] for s in sites if s.resource] if g]
    parts = [run_on_site(group[0], _group_labels, cfg, group, sources) for group in groups]
    labels = pd.concat([p[0] for p in parts], ignore_index=True)
    table = pd.concat([p[1] for p in parts], ignore_index=True)
    write_labels(labels, table, out)
    return labels, table
