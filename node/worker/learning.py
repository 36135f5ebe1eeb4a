"""A station's own normal, from the scores of its first series: the arithmetic, no database.

The shipped bundle's threshold is the 1% quantile of normal slices from IXI's scanner. Another
scanner's normal slices may sit lower (or higher) on the bundle's score, and spread wider or
narrower, so the same threshold flags too many of them (or too few). A station's reference
places its own normal on the bundle's scale with two numbers taken from its first series:

- the centre C: the median over its series of each series' median foreground slice score;
- the low L: the bundle's target-FPR quantile (1%) of all their foreground slice scores.

Then a slice score s maps to ``s' = M + (s - C) * (M - T) / (C - L)``, where T is the bundle's
threshold and M the median of its normal calibration slices: the station's centre lands on
the bundle's median and the station's 1% on the bundle's threshold, so that ``s' < T`` flags
about 1% of the station's normal slices, and a slice as far below the station's normal as an
artifact is below the bundle's is flagged as it would be there.

Since the mapping sends L onto T, a slice is flagged exactly when its own score is below L:
the verdicts rest on L alone (C places the reported score and its confidence).

The first series are not checked by anyone, so a few bad ones (a whole series with motion, one
with a bad block) must not move the reference: a series whose median, or whose 10th
percentile, is an outlier below the other series' (a modified z-score below -3.5: more than
3.5 robust standard deviations, 1.4826 median absolute deviations each, below their median;
Iglewicz and Hoaglin's rule) is left out. Only outliers: leaving out a fixed share of the
lowest series (the worst 20% by each, as this module first did) also leaves out a station's
ordinary low subjects, its L is then too high, and held-out normal slices of simulated sites
were flagged at about three times the target rate (``bench/station_learning.py``, README). A
person's review on the dashboard overrides this: a series marked a false alarm or confirmed
normal is always used and never left out; a confirmed flag is never used.

A 1% slice rate is not a 1% series rate: a series' low slices come together (its ends, its
subject: the skull base of a few heads), and on simulated sites of whole axial IXI series one
normal series in four to six gets 3 or more slices below L (``bench/station_learning.py``).
So the station also learns how many low slices its normal series have: a calibrated station
calls a series abnormal from ``min_flagged`` slices below L, one more than the kept learning
series with the second-most had (``SERIES_ALLOWED``: at most one of them would have been
flagged, so that one bad series that escaped the outlier rule does not raise the count), and
never fewer than the routing rule's ``min_abnormal_slices``. On the same simulated sites this
halves the normal series flagged (noise 2%: 18.3% -> 9.9%; gamma 0.75: 25.4% -> 12.8%) and
keeps 95-100% of the series with a moderate motion block flagged (node/models/README.md).

With them the reference counts the kept learning series that a reference built from the
other kept series would flag (leave one out): an estimate of the share of the station's
normal series it will flag, which the learning series themselves cannot give (the low and
the count were fitted on them). The Scanners page and ``vaenode queue senders`` show it, so
that the admin sees the rate the station will flag at before its verdicts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

#: A learning series whose median or 10th percentile has a modified z-score below minus this
#: (Iglewicz and Hoaglin's outlier rule) is left out unless a person reviewed it as normal.
OUTLIER_Z = 3.5
#: Median absolute deviations per standard deviation of a normal distribution (1 / 0.6745).
MAD_TO_SD = 1.4826
#: The low quantile of a series' slice scores that catches a bad block in it.
SERIES_LOW_QUANTILE = 0.1
#: Kept learning series that a calibrated station's series count (``min_flagged``) may still
#: flag: the count is one more than the (this + 1)-th most low slices among them.
SERIES_ALLOWED = 1


class Review(str, Enum):  # noqa: UP042 - compared with stored strings
    """What a person said of a learning series on the dashboard (its latest review)."""

    NONE = "none"  # not reviewed: used unless trimmed
    NORMAL = "normal"  # a false alarm, or a normal verdict confirmed: always used
    FLAGGED = "flagged"  # a flag confirmed: never used


class ReferenceRefused(ValueError):
    """The learning series give no usable reference (the message says why)."""


@dataclass(frozen=True)
class LearningSeries:
    """One learning series: its foreground slice scores (the bundle's own score, before any
    station reference) and its review."""

    series_id: int
    scores: np.ndarray
    review: Review = Review.NONE
    #: Slices below the low that make this series abnormal (its routing rule's
    #: ``min_abnormal_slices``).
    min_flagged: int = 1


@dataclass(frozen=True)
class Selection:
    """Which learning series a reference uses.

    Attributes:
        kept: series ids used (reviewed normal ones and unreviewed ones not trimmed).
        trimmed: unreviewed series left out as outliers below the others.
        excluded: confirmed flags and series with no foreground slice.
    """

    kept: tuple[int, ...]
    trimmed: tuple[int, ...]
    excluded: tuple[int, ...]


@dataclass(frozen=True)
class Reference:
    """A station's normal on the bundle's score.

    Attributes:
        centre: C, the median of the kept series' median foreground scores.
        low: L, the ``target_fpr`` quantile of the kept series' pooled foreground scores.
        selection: which series it was built from.
        slices: foreground slices pooled for ``low``.
        min_flagged: slices below ``low`` from which the station's series are abnormal, before
            the routing rule's floor (:func:`learned_min_flagged`).
        series_flagged: kept series that a reference built from the other kept series flags
            (leave one out; the module docstring).
    """

    centre: float
    low: float
    selection: Selection
    slices: int
    min_flagged: int = 1
    series_flagged: int = 0


def series_summary(scores: np.ndarray) -> tuple[float, float]:
    """(median, 10th percentile) of one series' foreground slice scores."""
    values = np.asarray(scores, dtype=np.float64)
    return float(np.median(values)), float(np.quantile(values, SERIES_LOW_QUANTILE))


def low_outliers(values: np.ndarray) -> np.ndarray:
    """Which values lie below the others' median by more than ``OUTLIER_Z`` robust standard
    deviations (``MAD_TO_SD`` median absolute deviations each).

    With no spread at all (more than half the values equal) any value below the median is one.
    """
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    spread = MAD_TO_SD * float(np.median(np.abs(values - median)))
    return values < median - OUTLIER_Z * spread


def select_series(series: Sequence[LearningSeries]) -> Selection:
    """Keep reviewed-normal series, drop confirmed flags, trim unreviewed outliers.

    The outliers are found among all usable series (reviewed or not), by median and
    separately by 10th percentile (:func:`low_outliers`); the unreviewed ones among them are
    trimmed.
    """
    excluded = [s.series_id for s in series
                if s.review is Review.FLAGGED or np.asarray(s.scores).size == 0]
    usable = [s for s in series if s.series_id not in excluded]
    worst: set[int] = set()
    if usable:
        summaries = np.array([series_summary(s.scores) for s in usable])
        outlying = low_outliers(summaries[:, 0]) | low_outliers(summaries[:, 1])
        worst = {s.series_id for s, out in zip(usable, outlying, strict=True) if out}
    trimmed = [s.series_id for s in usable if s.series_id in worst and s.review is Review.NONE]
    kept = [s.series_id for s in usable if s.series_id not in trimmed]
    return Selection(tuple(kept), tuple(trimmed), tuple(excluded))


def learned_min_flagged(counts: Sequence[int]) -> int:
    """The fewest slices below the low that make one of the station's series abnormal: one
    more than the ``SERIES_ALLOWED + 1``-th largest of its kept learning series' counts of
    slices below the low (1 when there are too few series to say)."""
    ordered = sorted((int(c) for c in counts), reverse=True)
    return 1 + ordered[SERIES_ALLOWED] if len(ordered) > SERIES_ALLOWED else 1


def _low_and_count(kept: Sequence[np.ndarray], target_fpr: float) -> tuple[float, int]:
    """The pooled ``target_fpr`` quantile of ``kept`` and the series count learned with it."""
    low = float(np.quantile(np.concatenate(kept), target_fpr))
    return low, learned_min_flagged([int(np.sum(v < low)) for v in kept])


def build_reference(series: Sequence[LearningSeries], target_fpr: float) -> Reference:
    """The station's centre, low and series count from its learning series.

    Raises:
        ReferenceRefused: no usable series, or a low not below the centre (the series are
            flat or degenerate: a mapping through them would divide by zero or invert).
    """
    if not 0.0 < target_fpr < 0.5:
        raise ValueError(f"target_fpr must lie in (0, 0.5), got {target_fpr}")
    selection = select_series(series)
    by_id = {s.series_id: s for s in series}
    kept = [np.asarray(by_id[i].scores, dtype=np.float64) for i in selection.kept]
    if not kept:
        raise ReferenceRefused(f"none of the {len(series)} learning series is usable "
                               f"({len(selection.excluded)} confirmed flags or empty)")
    centre = float(np.median([np.median(v) for v in kept]))
    low, min_flagged = _low_and_count(kept, target_fpr)
    if not (np.isfinite(centre) and np.isfinite(low)) or centre - low <= 0.0:
        raise ReferenceRefused(f"the station's low ({low:.6g}) is not below its centre "
                               f"({centre:.6g}): its series give no spread to map")
    flagged = 0
    if len(kept) > 1:
        for k, (i, own) in enumerate(zip(selection.kept, kept, strict=True)):
            other_low, other_count = _low_and_count(kept[:k] + kept[k + 1:], target_fpr)
            flagged += int(np.sum(own < other_low)) >= max(by_id[i].min_flagged, other_count)
    return Reference(centre, low, selection, int(sum(v.size for v in kept)), min_flagged,
                     flagged)


def map_scores(scores: np.ndarray, centre: float, low: float, median: float,
               threshold: float) -> np.ndarray:
    """``s' = M + (s - C) * (M - T) / (C - L)``: the station's scores on the bundle's scale.

    Raises:
        ValueError: ``centre <= low`` or ``median <= threshold`` (no scale to map onto).
    """
    if centre - low <= 0.0 or median - threshold <= 0.0:
        raise ValueError(f"cannot map: centre {centre} vs low {low}, median {median} vs "
                         f"threshold {threshold}")
    values = np.asarray(scores, dtype=np.float64)
    return median + (values - centre) * (median - threshold) / (centre - low)
