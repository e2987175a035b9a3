"""The synthetic-head generator's findings: where they are planted and what they leave alone."""

import numpy as np
import pytest

from fmct_ray.synthetic import Anatomy, Findings, synthetic_head, synthetic_scan

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
