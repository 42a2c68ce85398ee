"""The two-way bootstrap of docs/results.md's intervals, on grids whose answer is known by hand."""

import numpy as np
import pytest

from trapo_lightning.bootstrap import bootstrap_interval, paired_difference


def test_a_constant_grid_has_no_spread():
    interval = bootstrap_interval(np.full((3, 5), 0.25))
    assert interval == (0.25, 0.25, 0.25)


def test_problems_are_resampled():
    # One seed, problems [0, 1]: a draw of two problems has mean 0 (p = 1/4), 0.5 (1/2) or 1 (1/4), so the 95%
    # percentile interval runs from 0 to 1 around the mean 0.5.
    interval = bootstrap_interval(np.array([[0.0, 1.0]]), resamples=4000)
    assert interval == (0.5, 0.0, 1.0)


def test_seeds_are_resampled_too():
    # Seed 0 solves everything, seed 1 nothing: resampling problems alone would give exactly 0.5; resampling seeds
    # gives means 0, 0.5 or 1 as above.
    interval = bootstrap_interval(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), resamples=4000)
    assert interval == (0.5, 0.0, 1.0)


def test_pairing_removes_the_noise_both_methods_share():
    # b varies wildly over problems; a = b + 0.1 on every problem and seed, so every paired draw differs by 0.1
    # exactly, though either method's own interval is wide.
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 0.9, size=(3, 50))
    a = b + 0.1
    difference = paired_difference(a, b)
    assert difference.mean == pytest.approx(0.1)
    assert difference.low == pytest.approx(0.1) and difference.high == pytest.approx(0.1)
    assert not difference.holds(0.0)
    own = bootstrap_interval(a)
    assert own.high - own.low > 0.1


def test_equal_methods_differ_by_nothing():
    grid = np.random.default_rng(2).uniform(size=(2, 20))
    assert paired_difference(grid, grid).holds(0.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval(np.zeros((0, 3)))
