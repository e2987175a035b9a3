"""The ingest job end to end: Ray Data pipeline, store, manifest, quarantine, privacy, safety."""

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from fmct_ray import config as config_lib
from fmct_ray.eval.labels import LabelConfig, make_labels
from fmct_ray.ingest import SiteStore, load_volume
from fmct_ray.ingest.pipeline import IngestConfig, StorageError, run_ingest
from fmct_ray.ingest.privacy import date_shift_days, pseudonym
from fmct_ray.ingest.store import checksum
from fmct_ray.synthetic import synthetic_head, write_site
from fmct_ray.testing import S3_ENV, RayCluster, Relay, S3Server, kill_processes_under

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Corrupt or unusable inputs, each with a word its quarantine reason must contain."""
    rng = np.random.default_rng(1)
    head = np.round(rng.normal(-1000, 5, (40, 40, 30))).astype(np.int16)
    good = _nifti(folder / "tmp_good.nii.gz", head, np.eye(4))
    (folder / "truncated.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    (folder / "empty.nii").write_bytes(b"")
    (folder / "notes.dcm").write_text("this is not an image\n")
    _nifti(folder / "flat2d.nii.gz", head[:, :, :1], np.eye(4))
    nan = head.astype(np.float32)
    nan[5, 5, 5] = np.nan
    _nifti(folder / "nans.nii.gz", nan, np.eye(4))
    zero = nib.Nifti1Image(head, None)
    zero.header["pixdim"][1:4] = [1.0, 0.0, 1.0]  # nibabel refuses such an affine, not such a header
    nib.save(zero, folder / "zero_spacing.nii.gz")
    return {
        "truncated.nii.gz": "",
        "empty.nii": "",
        "notes.dcm": "",
        "flat2d.nii.gz": "",
        "nans.nii.gz": "nan",
        "zero_spacing.nii.gz": "voxel size",
    }


def check_store(uri: str, expected_rows: int) -> "object":
    store = SiteStore(uri)
    manifest = store.manifest()
    assert len(manifest) == expected_rows
    assert manifest["scan_id"].is_unique
    assert store.committed_ids() == set(manifest["scan_id"])
    for row in manifest.itertuples():
        vol = load_volume(uri, row.scan_id)
        assert vol.dtype == np.int16 and vol.shape == (224, 224, 224)
        assert checksum(vol) == row.checksum
    return manifest


def test_ingest_synthetic_and_bad_inputs_then_rerun_skips(tmp_path, ray_local, site_secret):
    raw = tmp_path / "raw"
    labels = write_site(raw, n=5, seed=7)
    bad = make_bad_inputs(raw / "broken")
    store_uri = str(tmp_path / "store")
    cfg = config_lib.load(
        IngestConfig, ROOT / "configs/ingest/default.yaml", ["patient_id_pattern=([^/]+)/[^/]+$"]
    )

    summary = run_ingest("site_a", str(raw), store_uri, cfg)
    assert summary["scans_found"] == 5 + len(bad)
    assert (summary["written"], summary["skipped"], summary["quarantined"]) == (5, 0, len(bad))
    manifest = check_store(store_uri, 5)
    assert set(manifest["site"]) == {"site_a"}
    assert manifest["scan_time"].dtype.kind == "M" and manifest["scan_time"].isna().all()  # NIfTI: no time
    assert set(manifest["split"]) <= {"train", "val", "test"}
    patients = {lab["patient"] for lab in labels}
    assert manifest["patient_id"].nunique() == len(patients)
    assert not any(p in " ".join(manifest["patient_id"]) for p in patients)  # pseudonymised
    for _pid, rows in manifest.groupby("patient_id"):
        assert rows["split"].nunique() == 1, "a patient's scans must share a split"

    quarantine = SiteStore(store_uri).quarantine()
    assert len(quarantine) == len(bad)
    for name, word in bad.items():
        reason = quarantine.loc[quarantine["path"].str.endswith(name), "reason"]
        assert len(reason) == 1, name
        assert reason.iloc[0] and word in reason.iloc[0].lower(), (name, reason.iloc[0])

    # geometry survives every stored orientation: the heads are centred in the 224^3 box
    for row in manifest.itertuples():
        fg = np.argwhere(load_volume(store_uri, row.scan_id) > -500)
        assert np.all(np.abs(fg.mean(0) - 111.5) < 12), fg.mean(0)

    again = run_ingest("site_a", str(raw), store_uri, cfg)
    assert (again["written"], again["skipped"], again["quarantined"]) == (0, 5, len(bad))
    check_store(store_uri, 5)
    assert len(list((tmp_path / "store" / "runs").iterdir())) == 2
    saved = next((tmp_path / "store" / "runs").iterdir()) / "config.yaml"
    assert config_lib.load(IngestConfig, saved) == cfg
    for run in (tmp_path / "store" / "runs").iterdir():  # each run keeps its own quarantine
        assert sorted(pd.read_csv(run / "quarantine.csv")["path"]) == sorted(quarantine["path"])


def test_store_of_another_site_is_refused(tmp_path, ray_local, site_secret):
    raw = tmp_path / "raw"
    write_site(raw, n=1, seed=3)
    run_ingest("site_a", str(raw), str(tmp_path / "store"), IngestConfig())
    with pytest.raises(ValueError, match="belongs to site 'site_a'"):
        run_ingest("site_b", str(raw), str(tmp_path / "store"), IngestConfig())


def test_a_failing_store_stops_the_job_and_quarantines_no_good_scan(tmp_path, ray_local, site_secret):
    """A store that cannot be written (here: a file where a new volume's folder must go) stops the
    job with an error naming the store; what was committed stays, and a re-run does the rest."""
    raw, store_uri = tmp_path / "raw", str(tmp_path / "store")
    write_site(raw / "first", n=2, seed=11)
    cfg = IngestConfig(storage_retries=1)
    assert run_ingest("site_a", str(raw), store_uri, cfg)["written"] == 2
    committed = SiteStore(store_uri).committed_ids()
    write_site(raw / "second", n=2, seed=12)
    new = sorted(p.relative_to(raw).as_posix() for p in (raw / "second").rglob("*.nii.gz"))
    blocked = pseudonym(site_secret.encode(), "scan", f"nifti:{new[0]}")
    (tmp_path / "store" / "volumes" / blocked).write_text("in the way")
    with pytest.raises(StorageError, match=f"store {store_uri}: .*after 2 attempts"):
        run_ingest("site_a", str(raw), store_uri, cfg)
    store = SiteStore(store_uri)
    assert committed <= store.committed_ids() and blocked not in store.committed_ids()
    assert not store.fs.exists(f"{store.root}/quarantine.parquet") or store.quarantine().empty
    check_store(store_uri, len(store.committed_ids()))  # intact volumes, consolidated manifest
    (tmp_path / "store" / "volumes" / blocked).unlink()
    again = run_ingest("site_a", str(raw), store_uri, cfg)
    assert again["quarantined"] == 0 and again["written"] + again["skipped"] == 4
    check_store(store_uri, 4)


def _to_s3(endpoint: str, retries: int, client_retries: int = 8) -> IngestConfig:
    """Ingest into S3 at `endpoint`: `retries` of ingest's own, `client_retries` of botocore's."""
    keys = ["key_env=AWS_ACCESS_KEY_ID", "secret_env=AWS_SECRET_ACCESS_KEY", f"endpoint_url={endpoint}"]
    keys.append(f"retries={client_retries}")
    return config_lib.load(
        IngestConfig, None, [f"output_storage.{k}" for k in keys] + [f"storage_retries={retries}"]
    )


def _outage_after_first_commit(fs, store: str, relay: Relay, seconds: float | None) -> threading.Thread:
    """Takes `relay` down as soon as the first scan of `store` is committed, for `seconds` (None:
    until the test brings it back)."""

    def committed() -> bool:
        try:
            return any(p.endswith(".json") for p in fs.ls(f"{store}/_rows", refresh=True))
        except FileNotFoundError:
            return False

    def cut():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not committed():
            time.sleep(0.05)
        relay.down()
        if seconds is not None:
            time.sleep(seconds)
            relay.up()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("outage_s", [2.0, None])
def test_an_s3_outage_mid_ingest_is_ridden_out_or_stops_the_job(
    tmp_path, s3, ray_local, site_secret, outage_s
):
    """The S3 endpoint goes away after the first scan is committed (a relay in front of the server
    stops listening and cuts its connections). A short outage is ridden out by the retries and
    the run completes; one that outlasts them stops the job with an error naming the store, keeps
    what was committed, quarantines nothing, and a re-run once the endpoint is back does the rest."""
    fs = s3.filesystem()
    bucket = f"outage-{'short' if outage_s else 'long'}"
    fs.mkdir(bucket)
    write_site(tmp_path / "raw", n=4, seed=21)
    uri = f"s3://{bucket}/site"
    with Relay(s3.port) as relay:
        cut = _outage_after_first_commit(fs, f"{bucket}/site", relay, outage_s)
        # the long outage outlasts the retries: few of them, so that the test is quick
        cfg = _to_s3(relay.endpoint, retries=3) if outage_s else _to_s3(relay.endpoint, 1, client_retries=0)
        if outage_s:
            summary = run_ingest("site_a", str(tmp_path / "raw"), uri, cfg)
            assert (summary["written"], summary["quarantined"]) == (4, 0)
        else:
            with pytest.raises(StorageError, match=f"store {uri}: "):
                run_ingest("site_a", str(tmp_path / "raw"), uri, cfg)
            cut.join(5)
            store = SiteStore(uri)
            committed = store.committed_ids()
            assert 1 <= len(committed) < 4 and not fs.exists(f"{bucket}/site/quarantine.parquet")
            relay.up()
            again = run_ingest("site_a", str(tmp_path / "raw"), uri, cfg)
            assert (again["skipped"], again["written"], again["quarantined"]) == (
                len(committed),
                4 - len(committed),
                0,
            )
    check_store(uri, 4)  # every scan once, intact


def test_refused_credentials_stop_the_job_with_an_error_naming_the_store(tmp_path, site_secret, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    write_site(tmp_path / "raw", n=1, seed=22)
    with S3Server(refuse_credentials=True) as server:
        cfg = _to_s3(server.endpoint, retries=3)
        start = time.monotonic()
        with pytest.raises(
            StorageError,
            match=r"store s3://stores/site: PermissionError: .*\(access refused: check the credentials",
        ):
            run_ingest("site_a", str(tmp_path / "raw"), "s3://stores/site", cfg)
        assert time.monotonic() - start < 30  # refused at once, not retried as if transient


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs: room for two stored heads of about 2 MB (root only: skipped where mounting is
    not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_store_whose_disk_fills_up_stops_the_job_and_keeps_what_was_committed(
    tmp_path, ray_local, site_secret, small_disk
):
    """A full disk is not the input's fault: the job stops with an error naming the store and the
    cause, quarantines nothing, keeps the committed scans intact, and completes once there is room."""
    write_site(tmp_path / "raw", n=6, seed=23)
    uri = str(small_disk / "store")
    with pytest.raises(StorageError, match=f"store {uri}: .*No space left on device"):
        run_ingest("site_a", str(tmp_path / "raw"), uri, IngestConfig())
    store = SiteStore(uri)
    committed = store.committed_ids()
    assert 1 <= len(committed) < 6, committed
    assert not store.fs.exists(f"{store.root}/quarantine.parquet") or store.quarantine().empty
    for scan_id in committed:  # what was committed before the disk filled is whole
        row = store.manifest().set_index("scan_id").loc[scan_id]
        assert checksum(load_volume(uri, scan_id)) == row["checksum"]
    moved = shutil.copytree(uri, tmp_path / "bigger")  # room again: the same store on a larger disk
    again = run_ingest("site_a", str(tmp_path / "raw"), str(moved), IngestConfig())
    assert (again["skipped"], again["quarantined"]) == (len(committed), 0)
    check_store(str(moved), 6)


def test_missing_secret_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FMCT_SITE_SECRET", raising=False)
    with pytest.raises(ValueError, match="FMCT_SITE_SECRET"):
        run_ingest("site_a", str(tmp_path), str(tmp_path / "store"), IngestConfig())


def _identity_strings(series: Path) -> list[str]:
    ds = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    values = [
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.PatientBirthDate),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
    ]
    values += [str(ds.get(k)) for k in ("AccessionNumber", "InstitutionName") if ds.get(k)]
    assert all(len(v) >= 6 for v in values[:3]), values
    return [v for v in values if len(v) >= 6]


def _date_strings(day: datetime) -> list[str]:
    """A calendar date as DICOM, ISO, US, European and dotted text."""
    formats = ("%Y%m%d", "%Y-%m-%d", "%Y/%m/%d", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y", "%Y.%m.%d")
    return [day.strftime(f) for f in formats]


def _real_times(series: Path) -> tuple[datetime, list[str]]:
    """Earliest acquisition time of the real series (pydicom, independently of the reader) and the
    text of every date its headers hold (acquisition, series, study, content)."""
    stamps, dates = [], set()
    for path in series.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stamps.append(datetime.strptime(f"{ds.AcquisitionDate}{ds.AcquisitionTime}", "%Y%m%d%H%M%S.%f"))
        dates |= {
            str(ds.get(f"{k}Date"))
            for k in ("Acquisition", "Series", "Study", "Content")
            if ds.get(f"{k}Date")
        }
    return min(stamps), sorted(dates)


def _run_job(*args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/ingest.py"), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kw,
    )


def test_real_dicom_ingest_leaks_no_identity(tmp_path, real_data, site_secret):
    """The real series through the job as a user runs it; no header identity and no real date in any
    output byte; the stored scan time is the real one moved by the patient's date shift, and EHR labels
    from it agree with labels from the real times (window edges included)."""
    series = real_data / "invesalius_0051_dicom"
    identity = _identity_strings(series)
    real_time, real_dates = _real_times(series)
    store = tmp_path / "store"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    try:
        proc = _run_job("--site", "real", "--input", str(series), "--output", str(store), env=env)
        log, _ = proc.communicate(timeout=600)
    finally:
        kill_processes_under(ray_tmp)
    assert proc.returncode == 0, log.decode()[-3000:]
    assert b'"written": 1' in log
    manifest = check_store(str(store), 1)
    row = manifest.iloc[0]
    assert row["source_format"] == "dicom" and row["kvp"] == 140.0 and row["slice_thickness"] == 2.0
    assert row["manufacturer"] and list(row["orig_shape"])[:2] == [512, 512]

    patient = str(pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).PatientID)
    assert row["patient_id"] == pseudonym(site_secret.encode(), "patient", patient)
    shift = date_shift_days(site_secret.encode(), row["patient_id"], 365)
    assert shift != 0 and row["date_shift_days"] == 365
    assert row["scan_time"] == pd.Timestamp(real_time + timedelta(days=shift))  # time of day kept
    shifted_dates = _date_strings(row["scan_time"].to_pydatetime())

    labels_out = tmp_path / "labels"
    _real_labels(manifest, patient, real_time, tmp_path, labels_out)

    outputs = [log] + [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    outputs += [p.read_bytes() for p in labels_out.rglob("*") if p.is_file()]
    outputs += [p.read_bytes() for p in Path(ray_tmp).rglob("*.log") if p.is_file()]
    outputs += [p.read_bytes() for p in Path(ray_tmp).rglob("*.out") if p.is_file()]
    outputs += [gzip.decompress(b) for b in outputs if b[:2] == b"\x1f\x8b"]
    for value in identity:
        for variant in {value, value.replace("^", " "), value.upper()}:
            assert not any(variant.encode() in blob for blob in outputs), f"{variant!r} leaked"
    assert real_dates, "the real series has dates to look for"
    for day in {d for text in real_dates for d in _date_strings(datetime.strptime(text, "%Y%m%d"))}:
        assert not any(day.encode() in blob for blob in outputs), f"real date {day!r} leaked"
    # the search does see dates: the shifted one is in the committed row (ISO text)
    assert any(shifted_dates[1].encode() in blob for blob in outputs)


def _real_labels(manifest, patient: str, real_time: datetime, tmp_path: Path, out: Path) -> None:
    """Labels of the real scan from an EHR table in real time (raw PatientID): the labels code shifts
    the EHR times by the patient's shift, so the window edges land exactly as in real time."""
    day = timedelta(days=1)
    ehr = pd.DataFrame(
        [
            (patient, real_time, "I61.5", "diagnosis"),  # at the scan time: in -> IVH, ICH
            (patient, real_time + 89 * day, "I60.7", "diagnosis"),  # day 89: in -> SAH
            (patient, real_time + 90 * day, "S06.5", "diagnosis"),  # day 90: out
            (patient, real_time - timedelta(seconds=1), "C71.1", "diagnosis"),  # before: out
        ],
        columns=["patient_id", "time", "code", "kind"],
    )
    ehr_path = tmp_path / "ehr_real_time.csv"
    ehr.to_csv(ehr_path, index=False)
    cfg = config_lib.load(LabelConfig, ROOT / "configs/labels/ehr_tasks.yaml", ["patient_ids=raw"])
    labels, _ = make_labels(cfg, manifest, out, ehr=ehr_path)
    ehr_path.unlink()  # the test's own input holds the real PatientID and dates; it is not an output
    got = labels.iloc[0]
    assert {t for t in cfg.tasks if got[t] == 1} == {"IVH", "ICH", "SAH"}
    assert all(got[t] == 0 for t in cfg.tasks if t not in {"IVH", "ICH", "SAH"})


def test_killed_ingest_resumes_with_every_scan_once(tmp_path, site_secret):
    raw = tmp_path / "raw"
    write_site(raw, n=10, seed=11)
    store = tmp_path / "store"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    rows = store / "_rows"
    try:
        proc = _run_job("--site", "s", "--input", str(raw), "--output", str(store), env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(rows.glob("*.json")) if rows.exists() else []) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
    finally:  # SIGKILL the driver and every Ray process it started, workers mid-write included
        kill_processes_under(ray_tmp, proc.pid)
        proc.wait()
    done_before = len(list(rows.glob("*.json")))
    assert 3 <= done_before < 10, "the kill should land midway"
    assert not (store / "manifest.parquet").exists()

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    try:
        proc = _run_job(
            "--site", "s", "--input", str(raw), "--output", str(store), env={**env, "RAY_TMPDIR": ray_tmp}
        )
        log, _ = proc.communicate(timeout=600)
    finally:
        kill_processes_under(ray_tmp)
    assert proc.returncode == 0, log.decode()[-3000:]
    summary = log.decode()[log.decode().rindex("ingest summary:") :]
    assert f'"skipped": {done_before},' in summary and f'"written": {10 - done_before},' in summary, summary
    check_store(str(store), 10)
    volumes = [p for p in (store / "volumes").iterdir() if p.is_dir()]
    assert len(volumes) == 10


def test_ingest_from_and_to_s3(tmp_path, s3, ray_local, site_secret, real_data):
    """Inputs read from one bucket, the store written to another, over a real loopback S3 server."""
    fs = s3.filesystem()
    for bucket in ("raw-site", "stores"):
        fs.mkdir(bucket)
    raw = tmp_path / "raw"
    write_site(raw / "synthetic", n=2, seed=5)
    fs.put(str(raw) + "/", "raw-site/in/", recursive=True)
    fs.put(str(real_data / "invesalius_0051_dicom") + "/", "raw-site/in/dicom/", recursive=True)
    keys = ["key_env=AWS_ACCESS_KEY_ID", "secret_env=AWS_SECRET_ACCESS_KEY", f"endpoint_url={s3.endpoint}"]
    cfg = config_lib.load(
        IngestConfig, None, [f"{side}.{k}" for side in ("input_storage", "output_storage") for k in keys]
    )
    summary = run_ingest("s3site", "s3://raw-site/in", "s3://stores/s3site", cfg)
    assert (summary["written"], summary["quarantined"]) == (3, 0), SiteStore(
        "s3://stores/s3site"
    ).quarantine()
    manifest = check_store("s3://stores/s3site", 3)
    assert sorted(manifest["source_format"]) == ["dicom", "nifti", "nifti"]
    assert fs.exists("stores/s3site/manifest.parquet") and fs.exists("stores/s3site/quarantine.parquet")
    again = run_ingest("s3site", "s3://raw-site/in", "s3://stores/s3site", cfg)
    assert again["skipped"] == 3 and again["written"] == 0


def test_ingest_through_ray_job_submit(tmp_path):
    """The job as users run it on a cluster: `ray start --head`, then `ray job submit`."""
    raw = tmp_path / "raw"
    write_site(raw, n=3, seed=21)
    store = tmp_path / "store"
    with RayCluster(num_cpus=2) as cluster:
        out = cluster.submit(
            "python",
            "jobs/ingest.py",
            "--site",
            "remote",
            "--input",
            str(raw),
            "--output",
            str(store),
            "--set",
            "store.codec=blosc-zstd",
            working_dir=str(ROOT),
            env={"FMCT_SITE_SECRET": "cluster-secret"},
        )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"written": 3' in out.stdout
    check_store(str(store), 3)
    saved = next((store / "runs").iterdir()) / "config.yaml"
    assert config_lib.load(IngestConfig, saved).store.codec == "blosc-zstd"


def test_series_are_grouped_by_uid_not_by_folder(tmp_path, ray_local, site_secret):
    """Two series interleaved in one folder, one of them spread over two folders -> two scans."""
    from synthetic import write_dicom_series

    rng = np.random.default_rng(0)
    shared, other = tmp_path / "raw" / "shared_folder", tmp_path / "raw" / "elsewhere"
    a = write_dicom_series(
        shared,
        synthetic_head(rng, (64, 64, 24), (1.0, 1.0, 2.0)),
        (1.0, 1.0, 2.0),
        patient_id="PAT-A",
        series_uid="1.2.826.0.1.3680043.2.1125.1",
    )
    write_dicom_series(
        tmp_path / "b_tmp",
        synthetic_head(rng, (64, 64, 20), (1.0, 1.0, 2.0)),
        (1.0, 1.0, 2.0),
        patient_id="PAT-B",
        series_uid="1.2.826.0.1.3680043.2.1125.2",
    )
    _set_dates(shared, "Acquisition", "20210501", "100000")
    _set_dates(tmp_path / "b_tmp", "Study", "20210503", "093000")
    for path in (tmp_path / "b_tmp").iterdir():  # series B joins series A's folder, with new names
        path.rename(shared / f"b_{path.name}")
    other.mkdir(parents=True)
    for path in a[::2]:  # half of series A moves to another folder
        path.rename(other / path.name)
    summary = run_ingest("grouping", str(tmp_path / "raw"), str(tmp_path / "store"), IngestConfig())
    assert (summary["scans_found"], summary["written"], summary["quarantined"]) == (2, 2, 0), summary
    manifest = check_store(str(tmp_path / "store"), 2)
    assert sorted(int(s[2]) for s in manifest["orig_shape"]) == [20, 24]
    assert manifest["patient_id"].nunique() == 2
    # scan times: acquisition level for A, study level for B, each moved by its patient's shift
    secret = site_secret.encode()
    for patient, real in (("PAT-A", datetime(2021, 5, 1, 10)), ("PAT-B", datetime(2021, 5, 3, 9, 30))):
        pid = pseudonym(secret, "patient", patient)
        got = manifest.loc[manifest["patient_id"] == pid, "scan_time"].iloc[0]
        assert got == pd.Timestamp(real + timedelta(days=date_shift_days(secret, pid, 365))), patient
        assert got != pd.Timestamp(real) and got.time() == real.time()


def _set_dates(folder: Path, level: str, date: str, time_of_day: str) -> None:
    """Give every DICOM file in `folder` a {level}Date / {level}Time."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        setattr(ds, f"{level}Date", date)
        setattr(ds, f"{level}Time", time_of_day)
        ds.save_as(path, enforce_file_format=True)


def test_masks_are_ingested_through_their_scans_geometry(tmp_path, ray_local, site_secret):
    """Issue 12: label volumes beside their NIfTI scans (`IngestConfig.masks`): an LPS scan's and an
    oblique one's mask land on the stored volume's ventricles, a scan without a mask is stored
    without one, a scan whose mask is corrupt is quarantined with the mask named, and mask files
    are never ingested as scans."""
    from fmct_ray.synthetic import Anatomy, Findings, orientation_affine, render_head

    shape = (150, 180, 150)
    anatomy = Anatomy(radii=(60.0, 78.0, 62.0), noise_hu=3.0)
    hu, labels = render_head(np.random.default_rng(0), shape, anatomy=anatomy, findings=Findings(1.8))
    raw = tmp_path / "raw"
    lps, affine = orientation_affine("LPS", shape, (1.0, 1.0, 1.0))
    _nifti(raw / "p1" / "lps.nii.gz", lps(hu).astype(np.int16), affine)
    _nifti(raw / "p1" / "lps_anatomy.nii.gz", lps(labels), affine)
    turn = np.eye(4)
    turn[:3, :3] = nib.eulerangles.euler2mat(z=np.radians(25))
    ras_affine = orientation_affine("RAS", shape, (1.0, 1.0, 1.0))[1]
    _nifti(raw / "p2" / "oblique.nii.gz", hu.astype(np.int16), turn @ ras_affine)
    _nifti(raw / "p2" / "oblique_anatomy.nii.gz", labels, turn @ ras_affine)
    _nifti(raw / "p3" / "no_mask.nii.gz", hu.astype(np.int16), ras_affine)
    _nifti(raw / "p4" / "bad.nii.gz", hu.astype(np.int16), ras_affine)
    (raw / "p4" / "bad_anatomy.nii.gz").write_bytes(b"not a nifti")
    cfg = config_lib.load(
        IngestConfig, None, ["masks={anatomy: _anatomy.nii.gz}", "patient_id_pattern=([^/]+)/[^/]+$"]
    )
    store_uri = str(tmp_path / "store")
    summary = run_ingest("site_m", str(raw), store_uri, cfg)
    assert summary["written"] == 3 and summary["quarantined"] == 1, summary
    store = SiteStore(store_uri)
    manifest = store.manifest()
    key = lambda rel: pseudonym(site_secret.encode(), "scan", f"nifti:{rel}")  # noqa: E731
    masks = dict(zip(manifest["scan_id"], manifest["masks"].map(list), strict=True))
    assert masks == {
        key("p1/lps.nii.gz"): ["anatomy"],
        key("p2/oblique.nii.gz"): ["anatomy"],
        key("p3/no_mask.nii.gz"): [],
    }
    for rel in ("p1/lps.nii.gz", "p2/oblique.nii.gz"):
        volume, mask = store.read_volume(key(rel)), store.read_mask(key(rel), "anatomy")
        assert abs(np.median(volume[mask == 1]) - 6) <= 3  # the ventricles' CSF
        assert (mask == 1).sum() == pytest.approx((labels == 1).sum(), rel=0.03)
    quarantine = store.quarantine()
    assert list(quarantine["path"].map(os.path.basename)) == ["bad.nii.gz"]
    assert "mask 'anatomy'" in quarantine["reason"][0] and "bad_anatomy.nii.gz" in quarantine["reason"][0]
