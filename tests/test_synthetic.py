"""The synthetic-head generator's findings: where they are planted and what they leave alone."""

import numpy as np
import pytest

from fmct_ray.synthetic import Anatomy, Findings, Lesion, Scan, render_head, synthetic_head, synthetic_scan

GRID = dict(shape=(112, 112, 112), spacing=(2.0, 2.0, 2.0))  # the whole head at 2 mm: fast


def x_mm(mask: np.ndarray) -> float:
    """Mean R coordinate (mm, grid centre 0) of the voxels of `mask`."""
    x = (np.arange(GRID["shape"][0]) - (GRID["shape"][0] - 1) / 2) * GRID["spacing"][0]
    return float((mask.sum((1, 2)) * x).sum() / mask.sum())


@pytest.mark.parametrize("side", [1.0, -1.0])
def test_midline_shift_moves_the_ventricles_away_from_a_hematoma(side):
    anatomy = Anatomy(noise_hu=1.0, texture_hu=0.0)
    shifted = Findings(shift_mm=8.0, shift_side=side, hematoma_hu=70.0)
    normal = synthetic_head(np.random.default_rng(0), anatomy=anatomy, **GRID)
    head = synthetic_head(np.random.default_rng(0), anatomy=anatomy, findings=shifted, **GRID)
    csf = lambda v: (v > -100) & (v < 15)  # noqa: E731 - the ventricles (air is -1000)
    assert x_mm(csf(head)) - x_mm(csf(normal)) == pytest.approx(-side * 8.0, abs=1.0)
    blood = (head > 60) & (head < 80) & ~((normal > 60) & (normal < 80))
    assert blood.sum() > 500  # a crescent of several ml at 8 mm3 a voxel
    assert np.sign(x_mm(blood)) == side  # over the hematoma's hemisphere


def test_atrophy_pulls_the_brain_from_the_skull_and_widens_sulci_and_ventricles():
    anatomy = Anatomy(noise_hu=0.0, texture_hu=0.0)
    normal = synthetic_head(np.random.default_rng(0), anatomy=anatomy, **GRID)
    csf = lambda v: (v > -100) & (v < 15)  # noqa: E731 - CSF (air is -1000, brain 27-38 HU)
    centre = np.zeros(GRID["shape"], bool)
    centre[36:76, 36:76, 36:76] = True  # the middle 80 mm: the ventricles, away from the cortex
    volumes = []
    for severity in (0.25, 1.0):
        head = synthetic_head(
            np.random.default_rng(0), anatomy=anatomy, findings=Findings(atrophy=severity), **GRID
        )
        assert csf(normal).sum() < csf(head).sum()
        assert (csf(normal) & centre).sum() < (csf(head) & centre).sum()  # ventricles ex vacuo
        assert ((head > 300) == (normal > 300)).all()  # the skull stays where it was
        volumes.append(csf(head).sum())
    assert volumes[0] < volumes[1]  # graded
    # the rim: along the R axis through the centre, CSF lies between the brain and the inner skull
    line = head[:, 56, 56]
    bone = np.flatnonzero(line > 300)
    inner = bone[bone < 56].max()
    assert (line[inner + 1 : inner + 2] < 15).all() and (normal[inner + 1, 56, 56] > 20)


@pytest.mark.parametrize("finding", ["midline_shift", "atrophy"])
def test_heads_without_a_finding_are_unchanged_by_asking_for_it(finding):
    """Midline shift and atrophy are drawn from child streams: the other findings, the anatomy and
    the noise of a head are those of the same seed without them."""
    label, lo, hi = {"midline_shift": ("midline_shift_mm", 3, 10), "atrophy": ("atrophy_severity", 0.25, 1)}[
        finding
    ]
    drawn = []
    for seed in range(8):
        plain = synthetic_scan(np.random.default_rng([3, seed]), 0.5, **GRID)
        asked = synthetic_scan(np.random.default_rng([3, seed]), 0.5, **{finding: 0.5}, **GRID)
        assert asked.anatomy == plain.anatomy and asked.findings.lesions == plain.findings.lesions
        record = asked.record()
        if not record[finding]:
            assert record[label] == 0 and np.array_equal(asked.volume, plain.volume)
        else:
            assert lo <= record[label] <= hi and not np.array_equal(asked.volume, plain.volume)
        drawn.append(record[finding])
    assert 0 < sum(drawn) < 8


def test_asking_for_survival_and_masks_leaves_the_head_unchanged():
    for seed in range(3):
        plain = synthetic_scan(np.random.default_rng([4, seed]), 0.5, **GRID)
        asked = synthetic_scan(np.random.default_rng([4, seed]), 0.5, survival=True, masks=True, **GRID)
        assert np.array_equal(asked.volume, plain.volume) and asked.findings == plain.findings
        years, event = asked.survival
        assert 0 < years <= 8 and asked.record()["survival_event"] == event
        assert plain.labels is None and asked.labels.shape == GRID["shape"]


def test_label_volume_and_lesion_point_lie_on_the_planted_structures():
    """A posed head (yaw, shift) with a hemorrhage: the ventricle label is CSF in the volume, the
    lesion label is the lesion's HU, the recorded lesion point (grid mm) falls in the largest
    lesion's label, and the ventricle volume matches the label count."""
    anatomy = Anatomy(yaw_deg=9.0, shift=(5.0, -4.0, 3.0), noise_hu=0.0, texture_hu=0.0)
    lesion = Lesion(centre=(-30.0, 20.0, 10.0), radius=9.0, hu=70.0)
    small = Lesion(centre=(-35.0, -30.0, 0.0), radius=4.0, hu=70.0)
    findings = Findings(lesions=(lesion, small))
    hu, labels = render_head(np.random.default_rng(0), anatomy=anatomy, findings=findings, **GRID)
    assert np.isin(np.unique(labels), [0, 1, 2]).all()
    assert (np.abs(hu[labels == 1] - 6.0) < 1e-3).all() and (hu[labels == 2] == 70.0).all()
    scan = Scan(hu, anatomy, findings, labels, GRID["spacing"])
    record = scan.record()
    point = np.array([record[f"lesion_{a}_mm"] for a in "xyz"])
    voxel = np.round(point / np.array(GRID["spacing"])).astype(int)
    assert labels[tuple(voxel)] == 2
    blob = np.argwhere(labels == 2) * np.array(GRID["spacing"])
    near = blob[np.linalg.norm(blob - point, axis=1) < 12]  # the large lesion's voxels, not the small one's
    np.testing.assert_allclose(near.mean(0), point, atol=2.0)
    assert (labels == 1).sum() * 8 / 1000 == pytest.approx(record["ventricle_ml"], rel=0.1)
    assert np.isnan(Scan(hu, anatomy, Findings(), labels).record()["lesion_x_mm"])


def test_survival_depends_on_the_findings():
    """Over many heads, the hazard the generator uses orders the times (C-index of the true risk
    well above 0.5), and some times are censored."""
    from fmct_ray.eval.task_metrics import c_index
    from fmct_ray.synthetic import draw_survival

    rng = np.random.default_rng(5)
    findings = [Findings(hydrocephalus=1.8 * (i % 2), atrophy=0.6 * ((i // 2) % 2)) for i in range(400)]
    times, events = zip(*(draw_survival(rng, f) for f in findings), strict=True)
    risk = [1.0 * (f.hydrocephalus > 0) + 1.5 * f.atrophy for f in findings]
    assert c_index(times, events, risk) > 0.65
    assert 0.1 < 1 - np.mean(events) < 0.9


def test_write_store_keeps_masks_beside_the_volumes_and_survival_in_the_rows(tmp_path):
    from fmct_ray.ingest import SiteStore
    from fmct_ray.synthetic import write_store

    rows = write_store(str(tmp_path / "s"), 2, site="s", seed=3, prevalence=1.0, survival=True, masks=True)
    store = SiteStore(str(tmp_path / "s"))
    assert list(store.manifest()["masks"].map(list)) == [["anatomy"], ["anatomy"]]
    for row in rows.itertuples():
        volume, mask = store.read_volume(row.scan_id), store.read_mask(row.scan_id, "anatomy")
        assert mask.shape == volume.shape and mask.dtype == np.uint8
        assert abs(np.median(volume[mask == 1]) - 6) < 3  # CSF (6 HU) under noise
        point = np.array([row.lesion_x_mm, row.lesion_y_mm, row.lesion_z_mm])
        assert mask[tuple(np.round(point).astype(int))] == 2  # the stored frame is voxel index x 1 mm
        assert row.survival_years > 0
    with pytest.raises(FileNotFoundError, match="no mask 'other'"):
        store.read_mask(rows.scan_id[0], "other")


def test_synthetic_sites_carry_a_target_of_every_category(tmp_path, monkeypatch):
    """NIfTI sites -> ingest -> the labels job: binary findings, ventricle volume, survival and the
    lesion centre (given in each file's world frame) in the label table, and the label volumes in
    the store; each lesion centre lands on hemorrhage voxels of its stored mask."""
    import pandas as pd

    from fmct_ray.ingest import SiteStore
    from fmct_ray.synthetic import MASK_CLASSES, ingest_synthetic_sites

    monkeypatch.setenv("FMCT_SITE_SECRET", "every-category")
    labels, report = ingest_synthetic_sites(
        tmp_path, {"a": 6}, seed=3, prevalence=0.8, masks=True, log=lambda m: None
    )
    report = report.set_index("task")
    assert set(report["kind"]) == {"binary", "continuous", "survival", "point"}
    assert report.loc["VentricleVolume", "labelled"] == report.loc["Survival", "labelled"] == 6
    raw = pd.read_csv(tmp_path / "raw" / "a_labels.csv")
    assert report.loc["LesionCentre", "labelled"] == raw["lesion_x"].notna().sum() > 0
    store = SiteStore(str(tmp_path / "stores" / "a"))
    manifest = store.manifest().set_index("scan_id")
    hemorrhage = MASK_CLASSES.index("hemorrhage")
    for row in labels.itertuples():
        assert list(manifest.loc[row.scan_id, "masks"]) == ["anatomy"]
        assert row.VentricleVolume > 0 and row.Survival_event in (0.0, 1.0)
        point = np.array([row.LesionCentre_x_mm, row.LesionCentre_y_mm, row.LesionCentre_z_mm])
        if np.isnan(point).all():
            continue
        mask = store.read_mask(row.scan_id, "anatomy")
        assert mask[tuple(np.round(point).astype(int))] == hemorrhage, (row.scan_id, point)
