"""Issue 12's probe suite on synthetic heads (fmct_ray.downstream.suite): the view cut of masks and
patch positions (fast), and (slow) every category's probe on embeddings that the embedding job
made of a store with every kind of target."""

import numpy as np
import pandas as pd
import pytest

from fmct_ray.data.views import ViewConfig
from fmct_ray.downstream.probes import ProbeConfig
from fmct_ray.downstream.suite import TaskSpec, patch_positions, run_probe, view_labels

VIEW = ViewConfig(crop=192, size=64)


def test_view_labels_and_patch_positions_follow_the_evaluation_view():
    """A box in the stored frame is where the view (centre 192^3 at 64^3, 3 mm voxels) and the
    patch positions (8^3 grid of 24 mm patches) say it is."""
    mask = np.zeros((224, 224, 224), np.uint8)
    mask[100:130, 40:70, 150:160] = 1
    cut = view_labels(mask, VIEW)
    assert cut.shape == (64, 64, 64)
    idx = np.argwhere(cut == 1)
    centres = 16 + idx * 3 + 1  # stored voxel sampled by each view voxel: start 16, step 3, centre 1
    assert (mask[tuple(centres.T)] == 1).all() and len(idx) == 10 * 10 * 3  # 30 x 30 x 10 voxels at 3 mm
    pos = patch_positions((8, 8, 8), VIEW)
    assert pos.shape == (512, 3)
    np.testing.assert_allclose(pos[0], [16 + 12 - 0.5] * 3)  # the first patch covers stored 16..39
    np.testing.assert_allclose(pos[-1], [16 + 192 - 12 - 0.5] * 3)
    np.testing.assert_allclose(pos[1] - pos[0], [0, 0, 24])  # row-major (d, h, w): w runs fastest


def test_run_probe_refuses_a_probe_of_another_category():
    frame = pd.DataFrame(
        {"scan_id": ["a"], "patient_id": ["p"], "site": ["s"], "cls": [np.zeros(4)], "v": [1.0]}
    )
    with pytest.raises(ValueError, match="takes the probes"):
        run_probe(TaskSpec("v", "continuous", ("v",)), "knn", frame, frame, frame, VIEW)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """150 synthetic heads (hydrocephalus and hemorrhage at 0.5, atrophy 0.4, survival, label
    volumes) in a store split 3:1:1, embedded at 64^3 with CLS, mean and token grid by
    `extract_embeddings` (random-init vit3d_tiny: the probes, not the backbone, are under test)."""
    import ray

    from fmct_ray.data.embed import BackboneConfig, EmbedConfig, extract_embeddings, load_embeddings
    from fmct_ray.ingest import SiteStore
    from fmct_ray.sites import SiteSpec
    from fmct_ray.synthetic import write_store

    root = tmp_path_factory.mktemp("suite")
    splits = ("train", "train", "train", "val", "test")
    kw = dict(prevalence=0.5, atrophy=0.4, survival=True, masks=True, splits=splits)
    labels = write_store(str(root / "store"), 150, site="s", seed=7, **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = EmbedConfig(
            backbone=BackboneConfig(preset="vit3d_tiny", seed=0),
            view=VIEW,
            tokens=True,
            actors=2,
            cpus_per_actor=0.5,
        )
        extract_embeddings(
            cfg,
            [SiteSpec("s", str(root / "store"))],
            str(root / "emb.parquet"),
            splits=("train", "val", "test"),
        )
    finally:
        ray.shutdown()
    emb = load_embeddings(str(root / "emb.parquet"))
    emb = emb.merge(labels.drop(columns=["patient_id", "site", "split"]), on="scan_id")
    emb = emb.assign(
        hydrocephalus=emb["hydrocephalus"].astype(float), survival_event=emb["survival_event"].astype(float)
    )
    store = SiteStore(str(root / "store"))
    masks = {s: view_labels(store.read_mask(s, "anatomy"), VIEW) for s in emb["scan_id"]}
    return {s: emb[emb["split"] == s].sort_values("scan_id") for s in ("train", "val", "test")}, masks


def probe(heads, spec, name, **cfg):
    parts, masks = heads
    return run_probe(spec, name, parts["train"], parts["val"], parts["test"], VIEW, masks, ProbeConfig(**cfg))


HYDRO = TaskSpec("hydrocephalus", "binary", ("hydrocephalus",))


@pytest.mark.slow  # about 6 minutes with the store and embeddings
def test_classification_probes_read_hydrocephalus(heads):
    assert probe(heads, HYDRO, "mlp", epochs=40)["auroc"] > 0.65  # measured 0.70
    assert probe(heads, HYDRO, "knn")["auroc"] > 0.55  # measured 0.61


@pytest.mark.slow
def test_regression_and_survival_probes_beat_chance(heads):
    m = probe(heads, TaskSpec("ventricle_ml", "continuous", ("ventricle_ml",)), "mlp", epochs=40)
    assert m["pearson_r"] > 0.5 and m["r2"] > 0.25  # measured 0.73, 0.52
    s = probe(heads, TaskSpec("survival", "survival", ("survival_years", "survival_event")), "mlp", epochs=40)
    assert s["c_index"] > 0.57  # measured 0.62; the generator's own hazard orders these times at about 0.7


@pytest.mark.slow
def test_segmentation_probe_finds_the_ventricles(heads):
    m = probe(
        heads, TaskSpec("anatomy", "mask", ("anatomy",), n_classes=3), "segmentation", epochs=30, batch_size=8
    )
    assert m["dice_1"] > 0.5  # measured 0.73 (ventricles); the lesions (label 2) stay at 0


def write_suite_inputs(root, n: int = 80, d: int = 8) -> dict:
    """Two sites of `n` scans whose embeddings carry every category's target (known answers): CLS
    features drive the binary, continuous and survival targets; one of the 8 patch tokens (a 2^3
    grid at a 32^3 view) carries a marker, its patch centre is the point and its octant the mask."""
    from fmct_ray.ingest import SiteStore
    from fmct_ray.ingest.store import StoreConfig

    view = ViewConfig(crop=192, size=32)
    pos = patch_positions((2, 2, 2), view)
    marker = np.random.default_rng(0).normal(size=d) * 3
    rows, emb, stores = [], [], {}
    for k, site in enumerate(("A", "B")):
        rng = np.random.default_rng(10 + k)
        store = SiteStore(str(root / site))
        store.init(site)
        stores[site] = str(root / site)
        for i in range(n):
            scan = f"{site}{i:02d}"
            cls = rng.normal(size=d)
            tokens = rng.normal(0, 0.3, (9, d))
            where = int(rng.integers(0, 8))
            tokens[1 + where] += marker
            mask = np.zeros((224, 224, 224), np.uint8)
            lo = [16 + 96 * int(b) for b in np.unravel_index(where, (2, 2, 2))]
            mask[tuple(slice(a, a + 96) for a in lo)] = 1
            store.write_mask(scan, "octant", mask, np.eye(4))
            t = rng.exponential(np.exp(-2 * cls[2]))
            split = "train" if i < n // 2 else "val" if i < 3 * n // 4 else "test"
            if site == "A" and split == "test":  # volumes for the report's segmentation overlay
                store.write_volume(
                    scan, mask.astype(np.int16) * 60, np.eye(4), StoreConfig(verify_writes=False)
                )
            rows.append(
                {
                    "scan_id": scan, "patient_id": f"p{scan}", "site": site, "split": split,
                    "finding": float(cls[0] > 0), "volume_ml": 20 + 5 * cls[1],
                    "years": min(t, 2.0), "event": float(t <= 2.0),
                    **{f"p_{a}": pos[where][j] for j, a in enumerate("xyz")},
                }
            )  # fmt: skip
            emb.append(
                {"scan_id": scan, "cls": cls.astype(np.float32), "tokens": tokens.astype(np.float16).ravel()}
            )
    pd.DataFrame(rows).to_parquet(root / "labels.parquet")
    pd.DataFrame(emb).to_parquet(root / "emb.parquet")
    return {"labels": str(root / "labels.parquet"), "embeddings": str(root / "emb.parquet"), "stores": stores}


def test_probe_sweep_covers_every_category_and_resumes(tmp_path):
    """`run_probe_sweep` on a local Ray cluster: every category's probes on both sites, each
    scored on both sites' test splits (external validation), well above chance on targets with
    known answers; run again, the finished experiment is restored and nothing re-runs."""
    import ray

    from fmct_ray.downstream.suite import SuiteConfig
    from fmct_ray.downstream.tune import SweepLaunch, probe_results, run_probe_sweep

    paths = write_suite_inputs(tmp_path)
    launch = SweepLaunch(name="suite", storage_path=str(tmp_path / "runs"), cpus_per_trial=0.5, **paths)
    tasks = (
        TaskSpec("finding", "binary", ("finding",)),
        TaskSpec("volume", "continuous", ("volume_ml",)),
        TaskSpec("survival", "survival", ("years", "event")),
        TaskSpec("marker", "point", ("p_x", "p_y", "p_z")),
        TaskSpec("octant", "mask", ("octant",)),
    )
    cfg = SuiteConfig(
        tasks=tasks,
        lrs=(3e-3,),
        view=ViewConfig(crop=192, size=32),
        probe=ProbeConfig(hidden=64, epochs=60, batch_size=8),
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        frame = run_probe_sweep(cfg, launch)
        assert len(frame) == (3 + 1 + 1 + 1 + 1) * 2  # binary: mlp, knn, retrieval; x 2 training sites
        files = sorted((tmp_path / "runs" / "suite" / "probes").glob("*.parquet"))
        before = {p.name: p.stat().st_mtime_ns for p in files}
        again = run_probe_sweep(cfg, launch)
        assert sorted(again["trial_id"]) == sorted(frame["trial_id"])
        assert {p.name: p.stat().st_mtime_ns for p in files} == before  # nothing re-ran
    finally:
        ray.shutdown()
    res = probe_results(launch).set_index(["task", "probe", "site", "eval_site"])
    labels = pd.read_parquet(paths["labels"])
    assert len(res) == 14 * 2 and set(res.index.get_level_values("eval_site")) == {"A", "B"}
    for site in ("A", "B"):
        for other in ("A", "B"):  # in-domain and external
            at = lambda task, probe: res.loc[(task, probe, site, other)]  # noqa: B023, E731
            assert at("finding", "mlp")["auroc"] > 0.75 and at("finding", "knn")["auroc"] > 0.6
            assert at("volume", "mlp")["pearson_r"] > 0.6
            assert at("survival", "mlp")["c_index"] > 0.6
            assert at("marker", "attention")["error_mm"] < 20  # patches are 96 mm apart
            assert at("octant", "segmentation")["dice_1"] > 0.8
            negatives = (labels.query("site == @other and split == 'test'")["finding"] == 0).sum()
            assert at("finding", "retrieval")["chance@10"] == pytest.approx(
                min(10, negatives + 1) / (negatives + 1)
            )
    # per-scan predictions, segmentations as NIfTI, and the report of every category from them
    from fmct_ray.eval.report import ReportConfig
    from fmct_ray.eval.suite_report import write_suite_report

    study = tmp_path / "runs" / "suite"
    assert len(list((study / "probe_predictions").glob("*.parquet"))) == len(frame)
    tests = labels.query("split == 'test'")["scan_id"]
    for site in ("A", "B"):
        assert {
            p.name
            for p in (
                study / "segmentations" / f"probe-model-octant-segmentation-{site}-s0-lr0.003"
            ).iterdir()
        } == {f"{s}.nii.gz" for s in tests}
    written = write_suite_report(
        str(study), tmp_path / "report", ReportConfig(200, 200), stores=paths["stores"]
    )
    table = pd.read_csv(written["suite_csv"])
    assert len(table) == 7 * 2  # every probe on both sites, in-domain
    assert set(table["category"]) == {
        "classification",
        "retrieval",
        "regression",
        "survival",
        "localisation",
        "segmentation",
    }
    assert table["p_vs_reference"].isna().all()  # one model: nothing to compare with
    assert written["suite_segmentation_octant"].stat().st_size > 1000


def test_a_prediction_written_as_nifti_sits_where_its_stored_voxels_are(tmp_path):
    """A label predicted on the view grid, written with `prediction_nifti`, lands in world
    coordinates on the stored voxels it was cut from (`view_labels`), for a stored volume whose
    box is not at the world origin."""
    import nibabel as nib

    from fmct_ray.downstream.suite import prediction_nifti

    stored_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    stored_affine[:3, 3] = [-111.0, -95.5, -60.0]
    mask = np.zeros((224, 224, 224), np.uint8)
    mask[100:130, 40:70, 150:160] = 1
    (tmp_path / "pred.nii.gz").write_bytes(prediction_nifti(view_labels(mask, VIEW), VIEW, stored_affine))
    image = nib.load(tmp_path / "pred.nii.gz")
    idx = np.argwhere(np.asarray(image.dataobj) == 1)
    world = nib.affines.apply_affine(image.affine, idx)
    stored_idx = nib.affines.apply_affine(np.linalg.inv(stored_affine), world)
    np.testing.assert_allclose(stored_idx, np.round(stored_idx), atol=1e-9)  # on stored voxel centres
    assert (mask[tuple(np.round(stored_idx).astype(int).T)] == 1).all()
    np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), 3.0)  # 3 mm voxels


def suite_predictions(root, seed: int = 0, n: int = 60) -> None:
    """Prediction files as the suite's trials write them (`prediction_rows` + run columns) for two
    models on one site: "good" predicts every target closely, "random" is noise; "good" has two
    learning rates, the second (worse on validation) must not be the one reported."""
    from fmct_ray.downstream.suite import prediction_rows

    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(float)
    frame = pd.DataFrame(
        {"scan_id": [f"s{i:02d}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)]}
    )
    frame = frame.assign(
        finding=y,
        volume=rng.normal(30, 5, n),
        years=rng.exponential(1.0, n),
        event=(rng.random(n) < 0.7).astype(float),
        **{f"c_{a}": rng.uniform(60, 160, n) for a in "xyz"},
    )
    masks = {s: (rng.random((8, 8, 8)) < 0.3).astype(np.uint8) for s in frame["scan_id"]}
    specs = {
        "mlp": TaskSpec("finding", "binary", ("finding",)),
        "retrieval": TaskSpec("finding", "binary", ("finding",)),
        "regress": TaskSpec("volume", "continuous", ("volume",)),
        "cox": TaskSpec("survival", "survival", ("years", "event")),
        "attention": TaskSpec("centre", "point", ("c_x", "c_y", "c_z")),
        "segmentation": TaskSpec("anatomy", "mask", ("anatomy",)),
    }
    points = frame[["c_x", "c_y", "c_z"]].to_numpy()
    for model, noise in (("good", 0.05), ("random", 1.0)):
        for lr, val in ((1e-3, 0.9), (3e-3, 0.1)) if model == "good" else ((1e-3, 0.5),):
            r = np.random.default_rng([seed, int(noise * 100), int(lr * 1e4)])
            bad = lr == 3e-3  # the run a wrong selection would report
            good = noise < 0.5 and not bad
            preds = {
                "mlp": y + (0.3 if good else 3) * r.normal(size=n),
                "retrieval": None,
                "regress": frame["volume"] + (0.5 if good else 10) * r.normal(size=n),
                "cox": -frame["years"] + (0.05 if good else 5) * r.normal(size=n),
                "attention": points + (2 if good else 40) * r.normal(size=(n, 3)),
                "segmentation": np.stack(
                    [
                        np.where(r.random((8, 8, 8)) < (0.05 if good else 0.5), 1 - masks[s], masks[s])
                        for s in frame["scan_id"]
                    ]
                ),
            }
            emb = frame.assign(cls=list(np.c_[y, np.zeros(n)] * (3 if good else 0) + r.normal(size=(n, 2))))
            for name, spec in specs.items():
                probe = {"regress": "mlp", "cox": "mlp"}.get(name, name)
                if probe == "retrieval" and bad:
                    continue
                rows = prediction_rows(spec, emb if probe == "retrieval" else frame, preds[name], masks)
                run = {"model": model, "task": spec.name, "probe": probe, "site": "A", "seed": 0, "lr": lr}
                key = f"{model}-{spec.name}-{probe}-{lr:g}"
                rows = rows.assign(**run, kind=spec.kind, val=val, key=key, eval_site="A")
                if spec.kind == "mask":
                    rows = rows.assign(mask_name="anatomy")
                (root / "probe_predictions").mkdir(parents=True, exist_ok=True)
                rows.to_parquet(root / "probe_predictions" / f"{key}.parquet")
                score_row = pd.DataFrame([{**run, "eval_site": "A", "ap": 0.5, "td_auroc": 0.6}])
                (root / "probes").mkdir(exist_ok=True)
                score_row.to_parquet(root / "probes" / f"{key}.parquet")


def test_suite_report_has_every_category_with_intervals_and_paired_tests(tmp_path):
    """The report's numbers from per-scan rows: each category's primary metric (recomputed here),
    a bootstrap interval around it, the better model's p < 0.05 against the reference and none for
    the reference itself, the run kept by validation, and a figure per category."""
    from fmct_ray.eval.metrics import auroc
    from fmct_ray.eval.report import ReportConfig
    from fmct_ray.eval.suite_report import write_suite_report

    suite_predictions(tmp_path / "study")
    written = write_suite_report(
        str(tmp_path / "study"), tmp_path / "report", ReportConfig(300, 300), reference="random"
    )
    table = pd.read_csv(written["suite_csv"]).set_index(["category", "model"])
    assert set(table.index.get_level_values(0)) == {
        "classification", "retrieval", "regression", "survival", "localisation", "segmentation",
    }  # fmt: skip
    assert (table["lr"].xs("good", level="model") == 1e-3).all()  # the best validation run of "good"
    assert ((table["lo"] <= table["value"]) & (table["value"] <= table["hi"])).all()
    good, ref = table.xs("good", level="model"), table.xs("random", level="model")
    assert (good["p_vs_reference"] < 0.05).all() and ref["p_vs_reference"].isna().all()
    higher = ["classification", "retrieval", "survival", "segmentation"]
    assert (good.loc[higher, "value"] > ref.loc[higher, "value"]).all()
    assert (
        good.loc[["regression", "localisation"], "value"] < ref.loc[["regression", "localisation"], "value"]
    ).all()
    rows = pd.read_parquet(tmp_path / "study" / "probe_predictions" / "good-finding-mlp-0.001.parquet")
    assert good.loc["classification", "value"] == pytest.approx(auroc(rows["y"], rows["score"]))
    assert good.loc["classification", "ap"] == 0.5  # the trial's own metrics row of the kept run
    md = written["suite_md"].read_text()
    for title in (
        "## Classification",
        "## Retrieval",
        "## Regression",
        "## Survival",
        "## Localisation",
        "## Segmentation",
    ):
        assert title in md
    for name in (
        "suite_recall_finding",
        "suite_regression_volume",
        "suite_km_survival",
        "suite_localisation_centre",
    ):
        assert written[name].stat().st_size > 1000
    # retrieval ranked against another candidate pool (other scans or labels) does not pair up
    ret = tmp_path / "study" / "probe_predictions" / "good-finding-retrieval-0.001.parquet"
    pd.read_parquet(ret).assign(pool="other").to_parquet(ret)
    again = write_suite_report(
        str(tmp_path / "study"), tmp_path / "r1", ReportConfig(50, 50), reference="random"
    )
    table = pd.read_csv(again["suite_csv"]).set_index(["category", "model"])
    assert np.isnan(table.loc[("retrieval", "good"), "p_vs_reference"])
    assert table.loc[("classification", "good"), "p_vs_reference"] < 0.05
    with pytest.raises(ValueError, match="reference model 'nope'"):
        write_suite_report(str(tmp_path / "study"), tmp_path / "r2", ReportConfig(10, 10), reference="nope")
