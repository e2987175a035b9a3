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


def test_heads_without_a_shift_are_unchanged_by_asking_for_one():
    """The shift is drawn from a child stream: the other findings, the anatomy and the noise of a
    head are those of the same seed without it."""
    for seed in range(8):
        plain = synthetic_scan(np.random.default_rng([3, seed]), 0.5, **GRID)
        asked = synthetic_scan(np.random.default_rng([3, seed]), 0.5, midline_shift=0.5, **GRID)
        assert asked.anatomy == plain.anatomy and asked.findings.lesions == plain.findings.lesions
        if asked.findings.shift_mm == 0:
            assert np.array_equal(asked.volume, plain.volume)
        else:
            assert asked.record()["midline_shift"] and 3 <= asked.record()["midline_shift_mm"] <= 10
    drawn = [synthetic_scan(np.random.default_rng([3, s]), 0.5, midline_shift=0.5, **GRID) for s in range(8)]
    assert 0 < sum(d.findings.shift_mm > 0 for d in drawn) < 8
