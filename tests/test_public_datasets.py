"""RSNA 2019 and CQ500 from the files as published (fixtures in `public_datasets.py`): series
selection, the label adapters (per-slice RSNA rows, multi-reader CQ500 reads), RSNA's header quirks,
and end to end: ingest each fixture, derive labels with the shipped configs, and (slow) a probe
sweep over them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from public_datasets import _twelve_bit, write_cq500, write_rsna
from synthetic import dicom_series

from fmct_ray import config as C
from fmct_ray.eval.labels import LabelConfig, join_public_labels, make_labels
from fmct_ray.ingest.pipeline import IngestConfig, run_ingest
from fmct_ray.ingest.privacy import pseudonym
from fmct_ray.ingest.readers import read_dicom_series
from fmct_ray.ingest.series import SeriesSelection, select_primary
from fmct_ray.ingest.store import SiteStore
from fmct_ray.sites import SiteSpec
from fmct_ray.synthetic import synthetic_head

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-of-site"  # conftest's site_secret


def labels_cfg(name: str, *overrides: str) -> LabelConfig:
    return C.load(LabelConfig, ROOT / "configs" / "labels" / f"{name}.yaml", list(overrides))


# -- series selection -------------------------------------------------------------------------------
def test_the_primary_series_follows_the_policy_and_says_why():
    policy = SeriesSelection()
    rows = [  # study, series, description, kernel, thickness, slices
        ("s1", "a", "CT BONE", "BONE", 0.625, 300),
        ("s1", "b", "CT 5mm", "STANDARD", 5.0, 36),
        ("s1", "c", "CT PLAIN THIN", "STANDARD", 0.625, 290),
        ("s2", "d", "HEAD", None, 8.0, 20),  # outside the thickness range
        ("s2", "e", "HEAD", None, 3.0, 40),
        ("s3", "f", "SCOUT", None, 2.0, 2),  # every series excluded: still one primary
        ("s3", "g", "LOCALIZER", None, 2.0, 3),
        (None, "h", None, None, None, 224),  # NIfTI: its own study
    ]
    manifest = pd.DataFrame(
        [
            {"study_id": st, "scan_id": sc, "kernel": k, "slice_thickness": t, "n_slices": n}
            | policy.flags(desc, k)
            for st, sc, desc, k, t, n in rows
        ]
    )
    got = select_primary(manifest.sample(frac=1, random_state=0), policy).set_index("scan_id")
    assert sorted(got.index[got["primary"]]) == ["c", "e", "g", "h"]
    assert got.loc["a", "series_excluded"] and not got.loc["b", "series_excluded"]
    assert got.loc["c", "primary_reason"] == "3 series; 1 excluded by pattern; most slices (290 vs 36)"
    assert got.loc["e", "primary_reason"] == "2 series; 1 outside 0.5-5 mm"
    assert "every series matches an exclude pattern" in got.loc["g", "primary_reason"]
    assert got.loc["h", "primary_reason"] == "the only series of its study"
    assert got.loc["b", "primary_reason"].startswith("not chosen: series c is")
    older = select_primary(pd.DataFrame({"scan_id": ["x", "y"]}), policy)  # manifests of older ingests
    assert older["primary"].all() and (older["primary_reason"] == "the only series of its study").all()


# -- label adapters ---------------------------------------------------------------------------------
def rsna_rows(slice_label: dict[str, dict[str, int]]) -> list[tuple[str, int]]:
    subtypes = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
    return [(f"{s}_{t}", labels.get(t, 0)) for s, labels in slice_label.items() for t in subtypes]


def test_rsna_slice_rows_become_series_labels_and_every_gap_is_reported(site_secret):
    def key(s):
        return pseudonym(SECRET.encode(), "slice", s)

    slices = pd.DataFrame(
        [(scan, key(f"ID_{scan}{k}")) for scan in ("a", "b", "c", "d") for k in range(3)],
        columns=["scan_id", "slice_id"],
    )
    manifest = pd.DataFrame({"scan_id": ["a", "b", "c", "d", "e"]})
    rows = rsna_rows(
        {
            "ID_a0": {}, "ID_a1": {"intraparenchymal": 1, "any": 1}, "ID_a2": {},  # IPH in one slice
            "ID_b0": {}, "ID_b1": {}, "ID_b2": {},  # every slice negative
            "ID_c0": {}, "ID_c1": {},  # c2 unlabelled: negative unknown
            "ID_d0": {"subdural": 1}, "ID_d1": {}, "ID_d2": {},  # SDH without any: contradictory
            "ID_zz": {},  # a slice not in the store
        }
    )  # fmt: skip
    rows += [("ID_b1_subdural", 1)]  # b1 subdural listed twice, 0 and 1
    table = pd.DataFrame(rows, columns=["ID", "Label"])
    labels, report = join_public_labels(table, manifest, labels_cfg("rsna2019"), "stage_2_train.csv", slices)
    got = labels.set_index("scan_id")
    assert got.loc["a", "IPH"] == 1 and got.loc["a", "Any"] == 1 and got.loc["a", "SDH"] == 0
    assert (got.loc["b", ["IPH", "IVH", "SAH", "EDH", "Any"]] == 0).all()
    assert pd.isna(got.loc["b", "SDH"])  # its contradictory slice leaves the series unknown
    assert got.loc["c"].isna().all() and got.loc["e"].isna().all()
    assert got.loc["d", "SDH"] == 1 and pd.isna(got.loc["d", "Any"])
    reasons = {(r["task"], r["reason"]): r["scans"] for r in report.rows}
    assert reasons[("SDH", "contradictory rows for the same slice")] == 1
    assert reasons[("IPH", "label rows for slices not in the store (ignored)")] == 1
    assert reasons[("IPH", "series with slices unlabelled and none positive")] == 1  # c
    assert reasons[("SDH", "series with slices unlabelled and none positive")] == 2  # b, c
    assert reasons[("Any", "negative while an included task (IPH, IVH, SAH, SDH, EDH) is positive")] == 1
    assert reasons[("IPH", "no row in the label file")] == 1  # e
    with pytest.raises(ValueError, match="stage_2_train.csv: labels per slice need"):
        join_public_labels(table, manifest, labels_cfg("rsna2019"), "stage_2_train.csv", None)
    bad = pd.DataFrame({"ID": ["nounderscore"], "Label": [1]})
    with pytest.raises(ValueError, match="'nounderscore' is not <slice id>_<subtype>"):
        join_public_labels(bad, manifest, labels_cfg("rsna2019"), "stage_2_train.csv", slices)


def cq500_reads(reads: dict[str, list]) -> pd.DataFrame:
    """reads.csv rows: name -> [R1, R2, R3] ICH reads (None: empty cell); other findings 0."""
    findings = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right")
    findings += ("MassEffect", "MidlineShift")
    rows = []
    for name, ich in reads.items():
        row = {"name": name, "Category": "B1"}
        for r, v in zip(("R1", "R2", "R3"), ich, strict=True):
            row |= {f"{r}:{f}": 0 for f in findings} | {f"{r}:ICH": v}
        rows.append(row)
    return pd.DataFrame(rows)


def test_cq500_reads_combine_per_study_onto_its_primary_series(site_secret):
    def patient(name):
        return pseudonym(SECRET.encode(), "patient", name)

    manifest = pd.DataFrame(
        {
            "scan_id": ["p1a", "p1b", "p2a", "p3a", "p3b", "p4a"],
            "patient_id": [
                patient(n) for n in ["CQ500-CT-1"] * 2 + ["CQ500-CT-2"] + ["CQ500-CT-3"] * 2 + ["X"]
            ],
            "study_id": ["s1", "s1", "s2", "s3", "s3b", "s4"],
            "primary": [True, False, True, True, True, True],
        }
    )
    table = cq500_reads(
        {
            "CQ500-CT-1": [1, 1, 0],
            "CQ500-CT-2": [1, 0, None],
            "CQ500-CT-3": [1, 1, 1],
            "CQ500-CT-9": [0, 0, 0],
        }
    )
    labels, report = join_public_labels(table, manifest, labels_cfg("cq500"), "reads.csv")
    got = labels.set_index("scan_id")["ICH"]
    assert got["p1a"] == 1 and pd.isna(got["p1b"])  # majority, on the primary series only
    assert pd.isna(got["p2a"])  # one positive, one negative, one empty: a tie
    assert pd.isna(got["p3a"]) and pd.isna(got["p3b"])  # two studies: the read cannot be placed
    assert pd.isna(got["p4a"])
    assert labels.set_index("scan_id").loc["p1a", "IPH"] == 0
    reasons = {(r["task"], r["reason"]): r["scans"] for r in report.rows}
    assert reasons[("ICH", "empty or tied reads")] == 1
    assert reasons[("ICH", "patient has several studies: the read cannot be placed")] == 2
    assert reasons[("ICH", "not the primary series of its study (study-level labels)")] == 1
    assert reasons[("ICH", "label rows for patients not in the manifest (ignored)")] == 1
    anyone = join_public_labels(table, manifest, labels_cfg("cq500", "combine=any"), "reads.csv")[0]
    assert anyone.set_index("scan_id").loc["p2a", "ICH"] == 1
    third = join_public_labels(table, manifest, labels_cfg("cq500", "readers=[R3]"), "reads.csv")[0]
    assert third.set_index("scan_id").loc["p1a", "ICH"] == 0
    stripped = manifest.assign(
        patient_id=[patient(n) for n in ["CQ500CT1"] * 2 + ["CQ500CT2", "x", "x", "X"]]
    )
    via = join_public_labels(table, stripped, labels_cfg("cq500", "id_strip='-'"), "reads.csv")[0]
    assert via.set_index("scan_id").loc["p1a", "ICH"] == 1  # a copy whose PatientID has no hyphens


def test_a_patient_listed_twice_with_different_reads_is_missing_and_reported(site_secret):
    manifest = pd.DataFrame(
        {
            "scan_id": ["a", "b"],
            "patient_id": [pseudonym(SECRET.encode(), "patient", n) for n in ("CQ500-CT-1", "CQ500-CT-2")],
            "primary": [True, True],
        }
    )
    table = pd.concat(
        [cq500_reads({"CQ500-CT-1": [1, 1, 1], "CQ500-CT-2": [0, 0, 0]})] * 2, ignore_index=True
    )
    table.loc[2, ["R1:ICH", "R2:ICH", "R3:ICH"]] = 0  # CQ500-CT-1 again, now negative
    labels, report = join_public_labels(table, manifest, labels_cfg("cq500"), "reads.csv")
    got = labels.set_index("scan_id")["ICH"]
    assert pd.isna(got["a"]) and got["b"] == 0  # a duplicate that agrees is kept
    reasons = {(r["task"], r["reason"]): r["scans"] for r in report.rows}
    assert reasons[("ICH", "patients with contradictory rows")] == 1


# -- header quirks ----------------------------------------------------------------------------------
def test_rsnas_twelve_bit_slices_read_as_the_same_hounsfield_units():
    import pydicom

    hu = np.clip(synthetic_head(np.random.default_rng(0), (64, 64, 12), (3.4, 3.4, 5.0)), -1000, 3000)
    files = dicom_series(hu, (3.4, 3.4, 5.0), seed=0)
    quirky = []
    for name, data in files:
        ds = pydicom.dcmread(__import__("io").BytesIO(data))
        _twelve_bit(ds)
        assert ds.pixel_array.max() > 3000  # air reads about 3096 before the correction
        buf = __import__("io").BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        quirky.append((name, buf.getvalue()))
    plain, fixed = read_dicom_series(files), read_dicom_series(quirky)
    np.testing.assert_allclose(fixed.array, plain.array, atol=0.5)
    assert fixed.array.min() >= -1001 and np.isclose(np.median(fixed.array), np.median(hu), atol=1)


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def labels_job(config: str, site: str, root: Path, public: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`jobs/labels.py` as its docstring shows it on the fixture's store and label file at `root`;
    returns (labels, report)."""
    out = root / "labels"
    cmd = [sys.executable, str(ROOT / "jobs" / "labels.py"), "--config", f"configs/labels/{config}.yaml"]
    cmd += ["--stores", f"{site}={root / 'store'}", "--public", str(root / "raw" / public), "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return pd.read_parquet(out / "labels.parquet"), pd.read_csv(out / "label_report.csv").fillna("")


@pytest.fixture(scope="module")
def rsna(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("rsna")
    real = ROOT.parent / "shared" / "data" / "real" / "invesalius_0051_dicom"
    truth = write_rsna(root / "raw", real=real if real.exists() else None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMCT_SITE_SECRET", SECRET)
        summary = run_ingest("R", str(root / "raw" / "stage_2_train"), str(root / "store"), IngestConfig())
    return root, truth, summary


@pytest.fixture(scope="module")
def cq500(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("cq500")
    truth = write_cq500(root / "raw", n_patients=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMCT_SITE_SECRET", SECRET)
        summary = run_ingest("C", str(root / "raw" / "images"), str(root / "store"), IngestConfig())
    return root, truth, summary


def test_rsna_as_published_ingests_and_labels_per_series(rsna, site_secret):
    root, truth, summary = rsna
    broken = truth[truth["broken"] != ""]
    assert summary["written"] == len(truth) - len(broken) and summary["quarantined"] == len(broken)
    store = SiteStore(str(root / "store"))
    reasons = " | ".join(store.quarantine()["reason"])
    assert all(reason in reasons for reason in broken["broken"])
    manifest, slices = store.manifest(), store.slices()
    assert manifest["primary"].all()  # one series per study
    assert sorted(slices.groupby("scan_id").size()) == sorted(truth[truth["broken"] == ""]["slices"])
    ids = {pseudonym(SECRET.encode(), "scan", f"dicom:{s}"): s for s in truth["series"]}
    labels, report = labels_job("rsna2019", "R", root, "stage_2_train.csv")
    got = labels.assign(series=labels["scan_id"].map(ids)).set_index("series")
    expect = truth[truth["broken"] == ""].set_index("series")
    assert (got.loc[expect.index, "IPH"].astype(int) == expect["IPH"].astype(int)).all()
    assert (got.loc[expect.index, "Any"].astype(int) == expect["Any"].astype(int)).all()
    assert (got[["IVH", "SAH", "SDH", "EDH"]] == 0).all().all()
    iph = report.set_index("task").loc["IPH"]
    assert iph["positive"] == expect["IPH"].sum() and iph["missing"] == 0
    assert "label rows for slices not in the store (ignored): 73" in iph["reasons"]  # the two broken series
    assert (root / "labels" / "label_report.md").exists()


@pytest.mark.slow  # 12 series ingested, about 40 s; the default tier keeps the RSNA fixture
def test_cq500_as_published_ingests_picks_the_plain_thin_series_and_labels_it(cq500, site_secret):
    root, truth, summary = cq500
    assert summary["written"] == 3 * len(truth) and summary["quarantined"] == 0
    manifest = SiteStore(str(root / "store")).manifest()
    assert manifest.groupby("study_id")["primary"].sum().eq(1).all() and manifest["study_id"].nunique() == 4
    primary = manifest[manifest["primary"]]
    assert (primary["slice_thickness"] == 2.5).all() and (primary["kernel"] == "STANDARD").all()
    assert manifest.loc[manifest["kernel"] == "BONE", "series_excluded"].all()
    labels, report = labels_job("cq500", "C", root, "reads.csv")
    names = {pseudonym(SECRET.encode(), "patient", n): n for n in truth["name"]}
    got = labels.dropna(subset=["ICH"]).assign(name=lambda f: f["patient_id"].map(names)).set_index("name")
    assert len(got) == len(truth)  # one labelled series per study
    assert (got.loc[truth["name"], "ICH"].astype(bool).to_numpy() == truth["ICH"].to_numpy()).all()
    ich = report.set_index("task").loc["ICH"]
    assert "not the primary series of its study (study-level labels): 8" in ich["reasons"]
    assert "label rows for patients not in the manifest (ignored): 1" in ich["reasons"]


@pytest.mark.slow  # on the CQ500 fixture
def test_pretraining_can_draw_every_series_or_only_primary_ones(cq500):
    from fmct_ray.data.source import DataConfig, make_plan

    root, truth, _ = cq500
    site = SiteSpec("C", str(root / "store"))
    every, primary = (make_plan(DataConfig(sites=(site,), split="all", series=s)) for s in ("all", "primary"))
    manifest = SiteStore(site.uri).manifest()
    assert every.scan_ids == (tuple(sorted(manifest["scan_id"])),) and every.sizes == [3 * len(truth)]
    assert primary.scan_ids == (tuple(sorted(manifest.loc[manifest["primary"], "scan_id"])),)
    assert primary.sizes == [len(truth)]


@pytest.mark.slow  # two larger fixtures ingested, embedded and probed on Ray Tune: about 4 minutes
def test_a_probe_sweep_runs_over_both_public_datasets(tmp_path, ray_local, site_secret):
    """RSNA and CQ500 as published -> ingest -> labels with the shipped configs -> cached embeddings
    of a frozen backbone -> a linear-probe sweep on IPH (a task of both), each site's probe also
    evaluated on the other's test split."""
    from fmct_ray.data.embed import EmbedConfig, extract_embeddings
    from fmct_ray.downstream.config import FinetuneConfig
    from fmct_ray.downstream.tune import SweepLaunch, run_finetune_sweep

    cfg = IngestConfig(split_fractions=(0.4, 0.3, 0.3))
    write_rsna(tmp_path / "rsna", n_series=14, seed=3)  # a seed whose val split has both classes
    write_cq500(tmp_path / "cq500", n_patients=12, seed=1)
    stores = {"R": str(tmp_path / "R"), "C": str(tmp_path / "C")}
    run_ingest("R", str(tmp_path / "rsna" / "stage_2_train"), stores["R"], cfg)
    run_ingest("C", str(tmp_path / "cq500" / "images"), stores["C"], cfg)
    tables = []
    for site, config, public in (
        ("R", "rsna2019", "rsna/stage_2_train.csv"),
        ("C", "cq500", "cq500/reads.csv"),
    ):
        store = SiteStore(stores[site])
        labels, _ = make_labels(
            labels_cfg(config), store.manifest(), tmp_path / f"labels_{site}", public=tmp_path / public,
            slices=store.slices(),
        )  # fmt: skip
        tables.append(labels[["scan_id", "patient_id", "site", "split", "IPH"]].dropna(subset=["IPH"]))
    pd.concat(tables).to_parquet(tmp_path / "labels.parquet", index=False)
    ecfg = C.load(EmbedConfig, None, ["backbone.preset=vit3d_tiny", "view.size=32", "patch_mean=true"])
    written = 12 + 3 * 12  # RSNA: 2 of 14 series quarantined
    sites = [SiteSpec(name, uri) for name, uri in stores.items()]
    assert extract_embeddings(ecfg, sites, str(tmp_path / "emb.parquet")) == written
    launch = SweepLaunch(
        name="public",
        storage_path=str(tmp_path / "runs"),
        labels=str(tmp_path / "labels.parquet"),
        embeddings=str(tmp_path / "emb.parquet"),
        cpus_per_trial=0.5,
    )
    overrides = ["sweep.tasks=[IPH]", "sweep.modes=[linear]", "sweep.shots=[0]", "sweep.seeds=1"]
    recipe = C.load(FinetuneConfig, ROOT / "configs" / "finetune" / "debug_tiny.yaml", overrides)
    frame = run_finetune_sweep(recipe, launch)
    assert sorted(frame["config/run/site"]) == ["C", "R"]  # K=0: one run per site
    assert frame["val_auroc"].notna().all()
    files = sorted((tmp_path / "runs" / "public" / "predictions").glob("*.parquet"))
    preds = pd.concat(pd.read_parquet(p) for p in files)
    pairs = set(zip(preds["train_site"], preds["eval_site"], strict=True))
    assert pairs == {("R", "R"), ("R", "C"), ("C", "C"), ("C", "R")}  # external validation both ways


# -- ingest at dataset scale ------------------------------------------------------------------------
def test_identification_reads_only_the_header_of_each_file(tmp_path, real_data, monkeypatch):
    """A 512 KiB real slice is identified from its first HEAD_BYTES; a header longer than that
    (a 100 kB comment) is read whole; both give the keys that the whole file gives."""
    import pydicom

    from fmct_ray.ingest import pipeline

    real = sorted((real_data / "invesalius_0051_dicom").glob("*.dcm"))[0]
    ds = pydicom.dcmread(real)
    ds.ImageComments = "x" * 100_000  # (0020,4000): before the pixel data, past the head
    long_header = tmp_path / "long.dcm"
    ds.save_as(long_header)
    reads = []

    def spy(path, options, size=None):
        data = read_bytes(path, options, size)
        reads.append((Path(path).name, size, len(data)))
        return data

    read_bytes = pipeline.read_bytes
    monkeypatch.setattr(pipeline, "read_bytes", spy)
    identify = pipeline.Identify(SECRET.encode(), IngestConfig(), {})
    paths = [str(real), str(long_header)]
    out = identify({"path": np.array(paths), "rel": np.array(paths), "kind": np.array(["dicom"] * 2)})
    assert list(out["error"]) == ["", ""] and out["scan_id"][0] == out["scan_id"][1]  # same series
    head = pipeline.HEAD_BYTES
    assert real.stat().st_size > 4 * head
    assert reads == [
        (real.name, head, head),
        ("long.dcm", head, head),
        ("long.dcm", None, long_header.stat().st_size),
    ]
    whole = pipeline.read_dicom_header(real.read_bytes(), str(real))
    assert out["scan_id"][0] == pseudonym(SECRET.encode(), "scan", f"dicom:{whole['series_key']}")
