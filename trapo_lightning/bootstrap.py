"""Bootstrap intervals over problems and seeds, for comparing methods on a held-out set (docs/results.md).

A method's score is the mean accuracy over a grid `[seeds, problems]` (each cell: the share of a problem's samples
judged correct, for one training seed). Two sources of noise move that mean: which problems the test set happens
to hold, and which seeds trained the model. The two-way bootstrap resamples both: each replicate draws seeds with
replacement and, independently, problems with replacement, and takes the mean of the drawn cells. Differences
between two methods are bootstrapped paired (the same drawn problems and seed indices for both), which is what
makes a one-point difference on one shared test set resolvable at all; a difference whose interval holds 0 is
inside the noise.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    mean: float
    low: float
    high: float

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


def _replicates(grid: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` two-way bootstrap draws of a `[methods, seeds, problems]` array, per method."""
    if grid.ndim != 3 or 0 in grid.shape:
        raise ValueError(f"expected a non-empty [methods, seeds, problems] array, got shape {grid.shape}")
    rng = np.random.default_rng(seed)
    _, n_seeds, n_problems = grid.shape
    out = np.empty((resamples, grid.shape[0]))
    for r in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        problems = rng.integers(0, n_problems, n_problems)
        out[r] = grid[:, seeds][:, :, problems].mean(axis=(1, 2))
    return out


def bootstrap_interval(accuracy: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean of a `[seeds, problems]` accuracy grid and its two-way bootstrap percentile interval."""
    means = _replicates(np.asarray(accuracy, dtype=float)[None], resamples, seed)[:, 0]
    tail = (1 - level) / 2
    return Interval(float(np.mean(accuracy)), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def paired_difference(
    a: np.ndarray, b: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Interval:
    """Mean of a - b (both `[seeds, problems]`, same problems in the same order, seeds paired by index) and its
    paired two-way bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired grids must have one shape, got {a.shape} and {b.shape}")
    means = _replicates(np.stack([a, b]), resamples, seed)
    diffs = means[:, 0] - means[:, 1]
    tail = (1 - level) / 2
    return Interval(float(np.mean(a - b)), float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail)))
