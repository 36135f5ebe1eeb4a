"""A station's own normal, from the scores of its first series: the arithmetic, no database.

The shipped bundle's threshold is the 1% quantile of normal slices from IXI's scanner. Another
scanner's normal slices may sit lower (or higher) on the bundle's score, and spread wider or
narrower, so the same threshold flags too many of them (or too few). A station's reference
places its own normal on the bundle's scale, from its first series.

First each score is referred to its slice's position. Normal scores depend on where a slice
lies (the ends of a head hold less brain, and each protocol covers the head its own way), so
a slice is compared with the station's normal slices at its relative position: the kept
learning series' foreground slices are split into ``POSITION_BINS`` bins of relative position
in their stack, and a score s becomes ``r = (s - m) / d``, m its bin's median and d that median
minus the bin's 5th percentile (:class:`PositionReference`; the bundle's own position
reference, scoring item 5, does the same with IXI's slices). Then two numbers:

- the centre C: the median over the series of each series' median r;
- the low L: the quantile of all their r at half the bundle's target rate (``LOW_SHARE``:
  0.5% for 1%; each bin's level comes from few slices, which a held-out series pays for).

A referred score maps to ``s' = M + (r - C) * (M - T) / (C - L)``, where T is the bundle's
threshold and M the median of its normal calibration slices: the station's centre lands on
the bundle's median and its low on the bundle's threshold, and a slice as far below the
station's normal at its position as an artifact is below the bundle's is flagged as it would
be there. Since L maps onto T, a slice is flagged exactly when its r is below L: the verdicts
rest on the bins and L (C places the reported score and its confidence).

On the learning bench's simulated sites (``bench/station_learning.py``, one bad learning
series), held-out normal slices / slices of a moderate motion block flagged were 1.27% / 93.5%
(noise 2%) and 1.27% / 93.6% (gamma 0.75), where the 1% quantile of the unreferred scores
(this module until 2026-12-06) gave 1.26% / 77.7% and 1.57% / 97.6% (node/models/README.md).

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

A low slice rate is not a low series rate: a series' low slices come together (its ends, its
subject: the skull base of a few heads). So the station also learns how many low slices its
normal series have: a calibrated station calls a series abnormal from ``min_flagged`` slices
below L, one more than the kept learning series with the second-most had (``SERIES_ALLOWED``:
one bad series that escaped the outlier rule does not raise the count), each series counted
against the bins and low of the other kept series (its own slices pulled its in-sample bins
and low towards it: counted in sample the bench's count came to 3.3-3.7 slices and 15.8-17.5%
of held-out normal series were flagged; left out, 5.0-7.1 slices and 9.8% / 11.8%, where the
unreferred low gave 9.9% / 12.8%), and never fewer than the routing rule's
``min_abnormal_slices``. Nearly every series with a moderate motion block is still flagged
(99.9% / 100%).

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
from functools import cached_property

import numpy as np

from node.model.positions import fit_levels, position_bin, relative_positions

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
#: Bins of relative slice position in a station's position reference.
POSITION_BINS = 10
#: The station's low is the pooled quantile of its referred scores at this share of the
#: bundle's target rate (1% -> 0.5%): each bin's level and spread come from a few hundred
#: slices, which a held-out series pays for (at 0.75% the simulated sites' held-out normal
#: slices were flagged at 1.58% and 1.79%; node/models/README.md).
LOW_SHARE = 0.5


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
    #: The stack of the series that each score's slice is in (None: one stack); the scores
    #: run in stack order, each stack in slice order.
    stacks: np.ndarray | None = None

    @cached_property
    def positions(self) -> np.ndarray:
        """Each score's relative position in its stack (:func:`stack_positions`)."""
        n = np.asarray(self.scores).size
        stacks = np.zeros(n, dtype=np.int64) if self.stacks is None else self.stacks
        return stack_positions(stacks, np.ones(n, dtype=bool))


def stack_positions(stacks: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """0 to 1 along each stack's foreground slices, in the stack's order; a background slice
    takes the position between its foreground neighbours (the nearest end's outside them),
    and a stack without foreground 0.5 (such slices are never judged)."""
    stacks = np.asarray(stacks)
    foreground = np.asarray(foreground, dtype=bool)
    out = np.full(stacks.size, 0.5)
    for stack in np.unique(stacks):
        idx = np.flatnonzero(stacks == stack)
        own = foreground[idx]
        if own.any():
            where = np.flatnonzero(own)
            out[idx] = np.interp(np.arange(idx.size), where, relative_positions(own)[where])
    return out


@dataclass(frozen=True)
class PositionReference:
    """A station's normal score at each relative slice position: per bin, the median and
    the median minus the 5th percentile of its kept learning series' scores."""

    levels: tuple[float, ...]
    spreads: tuple[float, ...]

    @classmethod
    def fit(cls, series: Sequence[LearningSeries]) -> PositionReference:
        """The reference of ``series`` (at least one score among them)."""
        levels, spreads = fit_levels(np.concatenate([s.scores for s in series]),
                                     np.concatenate([s.positions for s in series]),
                                     POSITION_BINS)
        return cls(levels, spreads)

    def refer(self, scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(score - its bin's level) / its bin's spread."""
        k = position_bin(np.asarray(positions, dtype=np.float64), len(self.levels))
        return ((np.asarray(scores, dtype=np.float64) - np.asarray(self.levels)[k])
                / np.asarray(self.spreads)[k])


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
        centre: C, the median of the kept series' median referred scores.
        low: L, the ``LOW_SHARE * target_fpr`` quantile of the kept series' pooled referred
            scores.
        selection: which series it was built from.
        slices: foreground slices pooled for ``low``.
        position: the position reference that refers a score (the module docstring).
        min_flagged: slices below ``low`` from which the station's series are abnormal, before
            the routing rule's floor (:func:`learned_min_flagged` of the counts left out).
        series_flagged: kept series that a reference built from the other kept series flags
            (leave one out; the module docstring).
    """

    centre: float
    low: float
    selection: Selection
    slices: int
    position: PositionReference
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


def _fit(kept: Sequence[LearningSeries], target_fpr: float) -> tuple[PositionReference, float]:
    """The position reference of ``kept`` and its low (``LOW_SHARE * target_fpr``)."""
    position = PositionReference.fit(kept)
    referred = np.concatenate([position.refer(s.scores, s.positions) for s in kept])
    return position, float(np.quantile(referred, LOW_SHARE * target_fpr))


def _below(series: LearningSeries, position: PositionReference, low: float) -> int:
    return int(np.sum(position.refer(series.scores, series.positions) < low))


def _count(kept: Sequence[LearningSeries], target_fpr: float) -> int:
    """The series count learned from ``kept``: each series' slices below the low of a
    reference fitted on the others (:func:`learned_min_flagged`; 1 for a single series)."""
    if len(kept) < 2:
        return 1
    return learned_min_flagged([_below(own, *_fit([*kept[:k], *kept[k + 1:]], target_fpr))
                                for k, own in enumerate(kept)])


def build_reference(series: Sequence[LearningSeries], target_fpr: float, *,
                    estimate: bool = True) -> Reference:
    """The station's position reference, centre, low and series count from its learning
    series; with ``estimate``, also ``series_flagged`` (a reference and its count for each
    kept series left out: about n squared fits; a bench that needs no estimate skips it).

    Raises:
        ReferenceRefused: no usable series, or a low not below the centre (the series are
            flat or degenerate: a mapping through them would divide by zero or invert).
    """
    if not 0.0 < target_fpr < 0.5:
        raise ValueError(f"target_fpr must lie in (0, 0.5), got {target_fpr}")
    selection = select_series(series)
    by_id = {s.series_id: s for s in series}
    kept = [by_id[i] for i in selection.kept]
    if not kept:
        raise ReferenceRefused(f"none of the {len(series)} learning series is usable "
                               f"({len(selection.excluded)} confirmed flags or empty)")
    position, low = _fit(kept, target_fpr)
    centre = float(np.median([np.median(position.refer(s.scores, s.positions))
                              for s in kept]))
    if not (np.isfinite(centre) and np.isfinite(low)) or centre - low <= 0.0:
        raise ReferenceRefused(f"the station's low ({low:.6g}) is not below its centre "
                               f"({centre:.6g}): its series give no spread to map")
    flagged = 0
    if estimate and len(kept) > 1:
        for k, own in enumerate(kept):
            others = [*kept[:k], *kept[k + 1:]]
            flagged += _below(own, *_fit(others, target_fpr)) >= max(
                own.min_flagged, _count(others, target_fpr))
    slices = int(sum(np.asarray(s.scores).size for s in kept))
    return Reference(centre, low, selection, slices, position, _count(kept, target_fpr), flagged)


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
