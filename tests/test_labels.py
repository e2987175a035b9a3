"""Label derivation on small hand-made tables with known answers (window edges, prefix codes,
medications, derived tasks, missing and contradictory labels)."""

from pathlib import Path

import pandas as pd
import pytest

from fmct_ray import config as C
from fmct_ray.eval.labels import (
    LabelConfig,
    TaskDefinition,
    derive_ehr_labels,
    join_public_labels,
    make_labels,
)
from fmct_ray.ingest.pipeline import pseudonym
from fmct_ray.ingest.privacy import date_shift_days, secret_check

ROOT = Path(__file__).resolve().parents[1]
EHR_TASKS = ROOT / "configs" / "labels" / "ehr_tasks.yaml"
T0 = pd.Timestamp("2024-01-10 08:00")


@pytest.fixture(scope="module")
def cfg():
    return C.load(LabelConfig, EHR_TASKS)


def ehr_rows():
    day = pd.Timedelta(days=1)
    return pd.DataFrame(
        [
            # p1: SAH by prefix code I60.7 on day 89 (inside); IPH I61.0 one second before the scan (outside)
            ("p1", T0 + 89 * day, "I60.7", "diagnosis"),
            ("p1", T0 - pd.Timedelta(seconds=1), "I61.0", "diagnosis"),
            # p2: IVH I61.5 exactly at the scan time (inside) -> IVH and derived ICH; SDH on day 90 (outside)
            ("p2", T0, "I615", "diagnosis"),
            ("p2", T0 + 90 * day, "S06.5", "diagnosis"),
            # p3: dementia by medication only (free-text drug entry); G91.1 matches the prefix G91.*
            ("p3", T0 + 5 * day, "Donepezil 10 mg tablet", "medication"),
            ("p3", T0 + 6 * day, "G91.1", "diagnosis"),
            # p4: S06.5X0A is not S06.5 (exact match unless subcodes); G30.1 matches the prefix G30.*
            ("p4", T0 + day, "S06.5X0A", "diagnosis"),
            ("p4", T0 + day, "G30.1", "diagnosis"),
            # p5: a diagnosis row whose text is a drug name does not count as a medication
            ("p5", T0 + day, "memantine", "diagnosis"),
        ],
        columns=["patient_id", "time", "code", "kind"],
    )


def scans():
    return pd.DataFrame(
        {
            "scan_id": ["s1", "s2", "s3", "s4", "s5", "s6", "s7"],
            "patient_id": ["p1", "p2", "p3", "p4", "p5", "p6", "p1"],
            "scan_time": [T0] * 6 + [pd.NaT],  # s6: patient without records; s7: no scan time
        }
    )


def test_ehr_labels_known_answers(cfg):
    labels, report = derive_ehr_labels(ehr_rows(), scans(), cfg)
    got = labels.set_index("scan_id")
    expect_pos = {
        "s1": {"SAH"},
        "s2": {"IVH", "ICH"},
        "s3": {"ADRD", "Hydrocephalus"},
        "s4": {"ADRD"},
        "s5": set(),
    }
    for scan, positives in expect_pos.items():
        for task in cfg.tasks:
            assert got.loc[scan, task] == int(task in positives), (scan, task)
    # never silently negative: no records / no scan time -> missing, and reported per task
    assert got.loc[["s6", "s7"]].isna().all().all()
    table = report.table(labels, cfg.tasks).set_index("task")
    assert table.loc["SAH", "positive"] == 1 and table.loc["SAH", "missing"] == 2
    assert "no scan time: 1" in table.loc["IPH", "reasons"]
    assert "patient has no EHR records: 1" in table.loc["IPH", "reasons"]


def test_subcodes_option_matches_icd10cm_extensions(cfg):
    import dataclasses

    labels, _ = derive_ehr_labels(ehr_rows(), scans(), dataclasses.replace(cfg, subcodes=True))
    assert labels.set_index("scan_id").loc["s4", "SDH"] == 1  # S06.5X0A extends S06.5


def test_without_kind_column_drug_names_and_codes_both_match(cfg):
    labels, _ = derive_ehr_labels(ehr_rows().drop(columns="kind"), scans(), cfg)
    assert labels.set_index("scan_id").loc["s5", "ADRD"] == 1


def test_window_length_is_configurable(cfg):
    import dataclasses

    labels, _ = derive_ehr_labels(ehr_rows(), scans(), dataclasses.replace(cfg, window_days=91))
    assert labels.set_index("scan_id").loc["s2", "SDH"] == 1  # day 90 now inside


def test_contradictory_scan_times_become_missing(cfg):
    two = pd.concat(
        [
            scans(),
            pd.DataFrame(
                {"scan_id": ["s1"], "patient_id": ["p1"], "scan_time": [T0 - pd.Timedelta(days=200)]}
            ),
        ]
    )
    labels, report = derive_ehr_labels(ehr_rows(), two, cfg)
    got = labels.set_index("scan_id")
    assert pd.isna(got.loc["s1", "SAH"]) and got.loc["s1", "IPH"] == 0  # agree on IPH, disagree on SAH
    assert {"task": "SAH", "reason": "contradictory rows for the same scan", "scans": 1} in report.rows


def test_raw_patient_ids_are_pseudonymised(cfg, monkeypatch):
    import dataclasses

    monkeypatch.setenv("FMCT_SITE_SECRET", "s3cret")
    ehr = ehr_rows()
    sc = scans().assign(patient_id=lambda f: [pseudonym(b"s3cret", "patient", p) for p in f.patient_id])
    labels, _ = derive_ehr_labels(ehr, sc, dataclasses.replace(cfg, patient_ids="raw"))
    assert labels.set_index("scan_id").loc["s1", "SAH"] == 1


def test_bad_tables_and_definitions_are_named():
    with pytest.raises(ValueError, match="EHR table: missing column"):
        derive_ehr_labels(pd.DataFrame({"patient_id": [], "time": []}), scans(), LabelConfig())
    with pytest.raises(C.ConfigError, match="includes unknown task"):
        C.load(LabelConfig, None, ["tasks={A: {include: [B]}}"])
    with pytest.raises(C.ConfigError, match="cycle"):
        C.load(LabelConfig, None, ["tasks={A: {include: [B]}, B: {include: [A]}}"])


def public_cfg():
    """A one-row-per-series table (the generic wide layout), keyed by scan id."""
    tasks = {
        "Any": TaskDefinition(column="any", include=("IPH", "IVH", "SAH", "SDH")),
        "IPH": TaskDefinition(column="intraparenchymal"),
        "IVH": TaskDefinition(column="intraventricular"),
        "SAH": TaskDefinition(column="subarachnoid"),
        "SDH": TaskDefinition(column="subdural"),
    }
    return LabelConfig(tasks=tasks, id_column="SeriesInstanceUID")


def test_public_labels_join_and_report():
    manifest = pd.DataFrame({"scan_id": ["a", "b", "c", "d", "e"]})
    table = pd.DataFrame(
        {
            "SeriesInstanceUID": ["a", "b", "c", "c", "e", "zz"],
            "any": [1, 0, 1, 1, 0, 1],
            "intraparenchymal": ["yes", 0, 1, 0, 1, 0],
            "intraventricular": [0, 0, None, None, 0, 0],
            "subarachnoid": [0, 0, 0, 0, 0, "maybe"],
            "subdural": [0, "0", "", 0, 0, 0],
        }
    )
    labels, report = join_public_labels(table, manifest, public_cfg())
    got = labels.set_index("scan_id")
    assert got.loc["a", "IPH"] == 1 and got.loc["b", "Any"] == 0
    assert pd.isna(got.loc["c", "IPH"])  # two rows disagree
    assert got.loc["c", "SDH"] == 0  # one empty, one 0: the known value is kept
    assert pd.isna(got.loc["c", "IVH"])  # empty in both rows
    assert got.loc["d"].isna().all()  # no row for d
    assert pd.isna(got.loc["e", "Any"]) and got.loc["e", "IPH"] == 1  # Any=0 contradicts IPH=1
    reasons = {(r["task"], r["reason"]): r["scans"] for r in report.rows}
    assert reasons[("IPH", "contradictory rows for the same scan")] == 1
    assert reasons[("Any", "negative while an included task (IPH, IVH, SAH, SDH) is positive")] == 1
    assert reasons[("SAH", "label rows for scans not in the manifest (ignored)")] == 1
    assert ("SAH", "invalid value in column 'subarachnoid'") not in reasons  # zz is not in the manifest
    assert reasons[("IPH", "no row in the label file")] == 1


def test_make_labels_writes_files(tmp_path, cfg):
    manifest = pd.DataFrame(
        {
            "scan_id": ["s1", "s2", "s6"],
            "patient_id": ["p1", "p2", "p6"],
            "site": "A",
            "split": ["train", "val", "test"],
        }
    )
    ehr = tmp_path / "ehr.csv"
    ehr_rows().to_csv(ehr, index=False)
    times = tmp_path / "times.csv"
    pd.DataFrame({"scan_id": ["s1", "s2", "s6"], "scan_time": [T0] * 3}).to_csv(times, index=False)
    labels, table = make_labels(cfg, manifest, tmp_path / "out", ehr=ehr, scan_times=times)
    assert list(labels.columns[:4]) == ["scan_id", "patient_id", "site", "split"]
    back = pd.read_parquet(tmp_path / "out" / "labels.parquet")
    assert back.set_index("scan_id").loc["s1", "SAH"] == 1 and pd.isna(
        back.set_index("scan_id").loc["s6", "SAH"]
    )
    assert "| task |" in (tmp_path / "out" / "label_report.md").read_text()
    with pytest.raises(ValueError, match="scan-times"):
        make_labels(cfg, manifest, tmp_path / "o2", ehr=ehr)
    with pytest.raises(ValueError, match="cannot read table"):
        make_labels(cfg, manifest, tmp_path / "o3", ehr=tmp_path / "nope.csv", scan_times=times)


# -- scan times from a date-shifted manifest --------------------------------------------------------
SECRET = "labels-test-secret"
EXPECT_POS = {
    "s1": {"SAH"},
    "s2": {"IVH", "ICH"},
    "s3": {"ADRD", "Hydrocephalus"},
    "s4": {"ADRD"},
    "s5": set(),
}


def shifted_manifest(max_days: int = 365) -> pd.DataFrame:
    """scans() as ingest stores them: each scan time moved by its patient's shift."""
    m = scans().assign(site="A", split="train")
    shift = [date_shift_days(SECRET.encode(), p, max_days) for p in m["patient_id"]]
    m["scan_time"] = m["scan_time"] + pd.to_timedelta(shift, unit="D")
    return m.assign(
        date_shift_days=max_days, secret_check=secret_check(SECRET.encode()) if max_days else None
    )


def check_known_answers(labels: pd.DataFrame, cfg) -> None:
    got = labels.set_index("scan_id")
    for scan, positives in EXPECT_POS.items():
        for task in cfg.tasks:
            assert got.loc[scan, task] == int(task in positives), (scan, task)
    assert got.loc[["s6", "s7"], list(cfg.tasks)].isna().all().all()


def test_shifted_manifest_gives_the_same_window_answers(tmp_path, cfg, monkeypatch):
    """Scan times from a shifted manifest, EHR times in real time: the labels code shifts the EHR
    by the same per-patient offset, so the window edges (at the scan time: in; +90 days: out;
    one second before: out) give the known answers."""
    monkeypatch.setenv("FMCT_SITE_SECRET", SECRET)
    manifest = shifted_manifest()
    shifts = manifest["scan_time"] - scans()["scan_time"]
    assert shifts.dropna().abs().min() >= pd.Timedelta(days=1) and shifts.nunique() > 3  # really moved
    ehr = tmp_path / "ehr.parquet"
    ehr_rows().to_parquet(ehr, index=False)
    labels, table = make_labels(cfg, manifest, tmp_path / "out", ehr=ehr)
    check_known_answers(labels, cfg)
    assert table.set_index("task").loc["SAH", "missing"] == 2
    # the shifting is what makes it right: the same manifest read as unshifted gives other answers
    unshifted, _ = derive_ehr_labels(ehr_rows(), manifest.assign(date_shift_days=0), cfg)
    assert (
        not unshifted.set_index("scan_id")
        .loc[list(EXPECT_POS)]
        .equals(labels.set_index("scan_id").loc[list(EXPECT_POS), list(cfg.tasks)])
    )


def test_zero_shift_manifest_needs_no_secret(tmp_path, cfg, monkeypatch):
    monkeypatch.delenv("FMCT_SITE_SECRET", raising=False)
    ehr = tmp_path / "ehr.csv"
    ehr_rows().to_csv(ehr, index=False)
    labels, _ = make_labels(cfg, shifted_manifest(0), tmp_path / "out", ehr=ehr)
    check_known_answers(labels, cfg)
    with pytest.raises(ValueError, match="date-shifted need the site secret in \\$FMCT_SITE_SECRET"):
        make_labels(cfg, shifted_manifest(), tmp_path / "o2", ehr=ehr)


def test_wrong_secret_is_refused(tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("FMCT_SITE_SECRET", "not-the-site-secret")
    ehr = tmp_path / "ehr.csv"
    ehr_rows().to_csv(ehr, index=False)
    with pytest.raises(ValueError, match="not the one the store's scan times were date-shifted with"):
        make_labels(cfg, shifted_manifest(), tmp_path / "out", ehr=ehr)


def test_scan_times_table_overrides_with_real_times(tmp_path, cfg, monkeypatch):
    """A NIfTI-only store (no times) next to a shifted one: real times from the table, EHR unshifted
    for those scans, shifted for the others; every scan gets its known answer."""
    monkeypatch.setenv("FMCT_SITE_SECRET", SECRET)
    manifest = shifted_manifest()
    nifti = manifest["scan_id"].isin(["s2", "s3"])
    manifest.loc[nifti, "scan_time"] = pd.NaT
    manifest.loc[nifti, ["date_shift_days", "secret_check"]] = [0, None]
    times = tmp_path / "times.csv"
    pd.DataFrame({"scan_id": ["s2", "s3", "s4"], "scan_time": [str(T0), str(T0), ""]}).to_csv(
        times, index=False
    )
    ehr = tmp_path / "ehr.csv"
    ehr_rows().to_csv(ehr, index=False)
    labels, _ = make_labels(cfg, manifest, tmp_path / "out", ehr=ehr, scan_times=times)
    check_known_answers(labels, cfg)  # s4: empty cell in the table -> the manifest's (shifted) time
    without, table = make_labels(cfg, manifest, tmp_path / "o2", ehr=ehr)  # no table: s2, s3 missing
    assert without.set_index("scan_id").loc[["s2", "s3"], "SAH"].isna().all()
    assert "no scan time: 3" in table.set_index("task").loc["SAH", "reasons"]


@pytest.mark.parametrize(
    ("target", "bad", "match"),
    [
        ("ehr", "next tuesday", "ehr.csv: column 'time': 1 unreadable time\\(s\\), the first in data row 3"),
        ("ehr", "", "ehr.csv: 1 record\\(s\\) without a time"),
        ("ehr", "2024-01-12T10:00:00+05:00", "ehr.csv: column 'time': times carry a time zone"),
        ("times", "2024-13-45", "times.csv: column 'scan_time': 1 unreadable time"),
    ],
)
def test_bad_times_name_the_file(tmp_path, cfg, target, bad, match):
    manifest = scans().drop(columns="scan_time").assign(site="A", split="train")
    rows = ehr_rows().astype({"time": str})
    times = pd.DataFrame({"scan_id": ["s1", "s2"], "scan_time": [str(T0), str(T0)]}).astype(str)
    if target == "ehr":
        rows.loc[2, "time"] = bad
    else:
        times.loc[1, "scan_time"] = bad
    rows.to_csv(tmp_path / "ehr.csv", index=False)
    times.to_csv(tmp_path / "times.csv", index=False)
    with pytest.raises(ValueError, match=match):
        make_labels(
            cfg, manifest, tmp_path / "out", ehr=tmp_path / "ehr.csv", scan_times=tmp_path / "times.csv"
        )


def test_times_in_several_formats_are_read(cfg):
    ehr = ehr_rows().astype({"time": object})
    ehr.loc[0, "time"] = (T0 + pd.Timedelta(days=89)).strftime("%d %B %Y %H:%M")  # one row in another format
    labels, _ = derive_ehr_labels(ehr, scans(), cfg)
    assert labels.set_index("scan_id").loc["s1", "SAH"] == 1
    with pytest.raises(ValueError, match="holds numbers"):
        derive_ehr_labels(ehr_rows().assign(time=1.7e9), scans(), cfg)


# -- typed targets ----------------------------------------------------------------------------------
TYPED = LabelConfig(
    tasks={
        "Bleed": TaskDefinition(column="bleed"),
        "volume": TaskDefinition(kind="continuous", column="vol_ml"),
        "os": TaskDefinition(kind="survival", columns=("years", "died")),
        "centre": TaskDefinition(kind="point", columns=("x", "y", "z")),
    }
)


def test_typed_targets_join_with_missing_invalid_and_contradictory_values_reported():
    manifest = pd.DataFrame(
        {"scan_id": list("abcdef"), "patient_id": list("abcdef"), "site": "A", "split": "train"}
    )
    table = pd.DataFrame(
        {
            "scan_id": ["a", "b", "c", "c", "d", "e", "e"],
            "bleed": [1, 0, 1, 1, 0, 0, 0],
            "vol_ml": ["12.5", "", "3", "3", "lots", "7", "8"],
            "years": [2.0, 1.5, -1.0, -1.0, 4.0, 0.5, 0.5],
            "died": ["yes", "no", 1, 1, "maybe", 0, 0],
            "x": [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 15.0],
            "y": [20.0, 21.0, 22.0, 22.0, None, 25.0, 25.0],
            "z": [30.0, 31.0, 32.0, 32.0, 34.0, 35.0, 35.0],
        }
    )
    labels, table = C_label_scans(TYPED, manifest, table)
    got = labels.set_index("scan_id")
    assert list(labels.columns[4:]) == [
        "Bleed", "volume", "os_time", "os_event", "centre_x_mm", "centre_y_mm", "centre_z_mm",
    ]  # fmt: skip
    assert got.loc["a", "volume"] == 12.5 and got.loc["c", "volume"] == 3.0
    assert got.loc["a", ["os_time", "os_event"]].tolist() == [2.0, 1.0]
    assert got.loc["b", ["os_time", "os_event"]].tolist() == [1.5, 0.0]
    assert got.loc["a", ["centre_x_mm", "centre_y_mm", "centre_z_mm"]].tolist() == [10.0, 20.0, 30.0]
    assert pd.isna(got.loc["b", "volume"])  # empty cell
    assert pd.isna(got.loc["d", "volume"]) and got.loc[["c", "d"], ["os_time", "os_event"]].isna().all().all()
    assert got.loc["c", ["centre_x_mm", "centre_y_mm", "centre_z_mm"]].isna().all()  # rows disagree on x
    assert got.loc["d", ["centre_x_mm", "centre_y_mm", "centre_z_mm"]].isna().all()  # y empty: all missing
    assert pd.isna(got.loc["e", "volume"]) and got.loc["e", "os_time"] == 0.5  # 7 vs 8 ml
    assert got.loc["f"].drop(["patient_id", "site", "split"]).isna().all()
    report = table.set_index("task")
    assert report.loc["volume", "kind"] == "continuous" and report.loc["volume", "labelled"] == 2
    assert report.loc["volume", "missing"] == 4 and pd.isna(report.loc["volume", "positive"])
    assert "empty cell: 1" in report.loc["volume", "reasons"]
    assert "invalid value in column(s) ['vol_ml']: 1" in report.loc["volume", "reasons"]
    assert "contradictory rows for the same scan: 1" in report.loc["volume", "reasons"]
    assert "no row in the label file: 1" in report.loc["volume", "reasons"]
    assert "invalid value in column(s) ['years', 'died']: 3" in report.loc["os", "reasons"]
    assert report.loc["os", "labelled"] == 3 and report.loc["Bleed", "positive"] == 2


def C_label_scans(cfg, manifest, table, **kw):
    from fmct_ray.eval.labels import label_scans

    path = Path(__import__("tempfile").mkdtemp()) / "typed.csv"
    table.to_csv(path, index=False)
    return label_scans(cfg, manifest, public=path, **kw)


def test_typed_targets_are_refused_where_they_cannot_come_from(tmp_path):
    with pytest.raises(ValueError, match="names 2 label-file columns"):
        LabelConfig(tasks={"os": TaskDefinition(kind="survival", columns=("t",))})
    with pytest.raises(ValueError, match="includes non-binary task"):
        LabelConfig(tasks={"v": TaskDefinition(kind="continuous"), "b": TaskDefinition(include=("v",))})
    only = LabelConfig(tasks={"v": TaskDefinition(kind="continuous", column="v")})  # no binary task
    one = pd.DataFrame({"scan_id": ["a"], "patient_id": "a", "site": "A", "split": "train"})
    got, table = C_label_scans(only, one, pd.DataFrame({"scan_id": ["a", "a"], "v": [1.0, float("inf")]}))
    assert got["v"].iloc[0] == 1.0  # the infinite row is invalid; the other row gives the value
    assert "invalid value in column(s) ['v']: 1" in table["reasons"].iloc[0]
    with pytest.raises(ValueError, match="from a label file, not codes"):
        LabelConfig(tasks={"v": TaskDefinition(kind="continuous", codes=("I61",))})
    with pytest.raises(ValueError, match="read per scan"):
        LabelConfig(tasks={"v": TaskDefinition(kind="continuous")}, id_kind="patient")
    from fmct_ray.eval.labels import derive_ehr_labels

    with pytest.raises(ValueError, match="health records give binary labels"):
        derive_ehr_labels(ehr_rows(), scans(), TYPED)
    manifest = pd.DataFrame({"scan_id": ["a"], "patient_id": ["a"], "site": "A", "split": "train"})
    table = pd.DataFrame({"scan_id": ["a"], "x": [1.0], "y": [2.0], "z": [3.0]})
    world = LabelConfig(tasks={"c": TaskDefinition(kind="point", columns=("x", "y", "z"), frame="ras")})
    with pytest.raises(ValueError, match="need the stores"):
        C_label_scans(world, manifest, table)
    with pytest.raises(ValueError, match="missing column"):
        C_label_scans(TYPED, manifest, table)


@pytest.mark.parametrize("orientation", ["LPS", "PIR"])
def test_world_points_land_on_their_structure_in_the_stored_volume(tmp_path, monkeypatch, orientation):
    """A synthetic head written as NIfTI in another orientation, ingested; its largest lesion's
    centre given in the file's RAS world frame (and as LPS) comes out of the labels job at the
    centre of that lesion's voxels in the stored volume's label mask."""
    import nibabel as nib
    import numpy as np

    from fmct_ray.eval.labels import site_labels
    from fmct_ray.ingest.pipeline import IngestConfig, run_ingest
    from fmct_ray.sites import SiteSpec
    from fmct_ray.synthetic import MASK_CLASSES, orientation_affine, synthetic_scan, to_int16

    monkeypatch.setenv("FMCT_SITE_SECRET", "typed-points")
    shape = (150, 170, 140)
    rng = np.random.default_rng(5)
    scan = synthetic_scan(rng, prevalence=1.0, shape=shape, masks=True)
    while not scan.findings.lesions:
        scan = synthetic_scan(rng, prevalence=1.0, shape=shape, masks=True)
    transform, affine = orientation_affine(orientation, shape, (1.0, 1.0, 1.0))
    raw = tmp_path / "raw" / "p1"
    raw.mkdir(parents=True)
    nib.save(nib.Nifti1Image(transform(to_int16(scan.volume)), affine), raw / "scan.nii.gz")
    nib.save(nib.Nifti1Image(transform(scan.labels), affine), raw / "scan_anatomy.nii.gz")
    cfg = IngestConfig(masks={"anatomy": "_anatomy.nii.gz"}, patient_id_pattern="([^/]+)/[^/]+$")
    run_ingest("A", str(tmp_path / "raw"), str(tmp_path / "store"), cfg)
    # the record's point is in the RAS-ordered grid (index x 1 mm); the file's world frame has
    # its origin at the grid's centre (orientation_affine)
    grid = np.array([scan.record()[f"lesion_{a}_mm"] for a in "xyz"])
    ras = grid - (np.array(shape) - 1) / 2
    label_file = tmp_path / "points.csv"
    pd.DataFrame(
        {
            "file": ["p1/scan.nii.gz"],
            "x": [ras[0]],
            "y": [ras[1]],
            "z": [ras[2]],
            "lx": [-ras[0]],
            "ly": [-ras[1]],
        }
    ).to_csv(label_file, index=False)
    tasks = {
        "ras": TaskDefinition(kind="point", columns=("x", "y", "z"), frame="ras"),
        "lps": TaskDefinition(kind="point", columns=("lx", "ly", "z"), frame="lps"),
    }
    labels, _ = site_labels(
        LabelConfig(tasks=tasks, id_column="file", id_kind="nifti_path"),
        [SiteSpec("A", str(tmp_path / "store"))],
        tmp_path / "labels",
        public=label_file,
    )
    from fmct_ray.ingest import SiteStore

    store = SiteStore(str(tmp_path / "store"))
    (scan_id,) = store.manifest()["scan_id"]
    lesion = np.argwhere(store.read_mask(scan_id, "anatomy") == MASK_CLASSES.index("hemorrhage"))
    # the largest lesion's voxels: those nearest the labelled point (lesions do not overlap)
    row = labels.set_index("scan_id").loc[scan_id]
    for task in tasks:
        point = row[[f"{task}_{a}_mm" for a in "xyz"]].to_numpy(float)
        near = lesion[np.linalg.norm(lesion - point, axis=1) < 12]
        assert len(near) > 20, (task, point)
        assert np.linalg.norm(near.mean(0) - point) < 1.5, (task, point, near.mean(0))
