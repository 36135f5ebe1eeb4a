"""Where a slice lies in its stack, and the level and spread of normal scores there.

Normal slice scores depend on where the slice lies: the ends of a head hold less brain and
score differently from its middle. Two references compare a slice with normal slices at its
relative position: the bundle's (:mod:`node.model.scoring`, item 5, fitted on IXI) and a
station's (:mod:`node.worker.learning`, fitted on the station's own first series). Both
need the same pieces, kept here apart from the scoring so that the worker's learning
arithmetic does not load torch with them.
"""

from __future__ import annotations

import numpy as np


def relative_positions(foreground: np.ndarray, descending: bool = False) -> np.ndarray:
    """0 to 1 along the foreground slices in the plane's anatomical direction (item 5 of the
    scoring docstring); NaN for background slices. ``descending``: the stack runs the other
    way."""
    pos = np.full(len(foreground), np.nan)
    idx = np.flatnonzero(foreground)
    if idx.size:
        ramp = np.linspace(0.0, 1.0, idx.size)
        pos[idx] = ramp[::-1] if descending else ramp
    return pos


def position_bin(positions: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each (non-NaN) relative position."""
    return np.clip((positions * bins).astype(int), 0, bins - 1)


def robust_level(scores: np.ndarray) -> tuple[float, float]:
    """(median, median minus 5th percentile) of normal scores: the level and spread a
    position reference compares with (the spread floored so that a constant set cannot
    divide by zero)."""
    med, q05 = np.quantile(np.asarray(scores, dtype=np.float64), [0.5, 0.05])
    return float(med), max(float(med - q05), 1e-6)


def fit_levels(scores: np.ndarray, positions: np.ndarray,
               bins: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The level and spread (:func:`robust_level`) of normal ``scores`` in each of ``bins``
    bins of their relative ``positions``; a bin without slices takes the overall level."""
    s = np.asarray(scores, dtype=np.float64)
    k = position_bin(np.asarray(positions, dtype=np.float64), bins)
    overall = robust_level(s)
    levels = [robust_level(s[k == b]) if np.any(k == b) else overall for b in range(bins)]
    return tuple(m for m, _ in levels), tuple(d for _, d in levels)
