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
be there. Since L maps onto T, a slice is flagged exactly when its r is below L (in a series
judged normal, below the image edge L_img, which lies further down: last paragraph): the
verdicts rest on the bins, L and L_img (C places the reported score and its confidence).

On the learning bench's simulated sites (``bench/station_learning.py``, one bad learning
series, every image below L counted), held-out normal slices / slices of a moderate motion
block flagged were 1.27% / 93.5% (noise 2%) and 1.27% / 93.6% (gamma 0.75), where the 1%
quantile of the unreferred scores (this module until 2026-12-06) gave 1.26% / 77.7% and
1.57% / 97.6% (node/models/README.md).

The first series are not checked by anyone, so a few bad ones (a whole series with motion, one
with a bad block) must not move the reference: a series whose median, or whose 10th
percentile, is an outlier below the other series' (a modified z-score below -3.5: more than
3.5 robust standard deviations, 1.4826 median absolute deviations each, below their median;
Iglewicz and Hoaglin's rule) is left out. Only outliers: leaving out a fixed share of the
lowest series (the worst 20% by each, as this module first did) also leaves out a station's
ordinary low subjects, its L is then too high, and held-out normal slices of simulated sites
were flagged at about three times the target rate (``bench/station_learning.py``, README). A
person's review on the dashboard overrides this: a series marked a false alarm or confirmed
normal is always used and never left out; a confirmed flag (or a series reported as a missed
artifact) is never used.

A low slice rate is not a low series rate: a series' low slices come together (its ends, a
few subjects' clusters low in the head), so counting a series' slices below L flags about one
normal series in ten after learning (``bench/station_learning.py``: 9.8% / 11.8% of held-out
normal series with the count learned left out). A calibrated station judges a series by one
number instead, the 10th percentile of its referred foreground scores
(:func:`series_statistic`): the series is abnormal when that lies below the station's series
edge E, below which one of the kept learning series' own 10th percentiles would be an
outlier (the rule above, :func:`outlier_edge`), each of those taken with a reference fitted on
the other kept series, as a new series is judged. On the same sites, with one bad learning
series, this flags 3.1% / 3.0% of held-out normal series and 94.2% / 95.0% of the series with
a moderate motion block (the count: 9.8% / 11.8% and 99.9% / 100%); with three bad learning
series 2.1% / 2.8% and 44.0% / 89.1% (node/models/README.md). References
calibrated before revision 0018 judge as they were built, by a count of slices below their
low (``min_flagged``).

With them the reference counts the kept learning series that a reference built from the
other kept series would flag (leave one out): an estimate of the share of the station's
normal series it will flag, which the learning series themselves cannot give (the bins and
the edge were fitted on them). The Scanners page and ``vaenode queue senders`` show it, so
that the admin sees the rate the station will flag at before its verdicts do.

An image is flagged below L only in a series the station judges abnormal (there the flags
say where the bad block is). Low images are spread over a third of the normal series, a few
each: on the same sites 33.2% / 34.6% of the held-out normal series had at least one image
below L, and each went to PACS with a "Quality Issue" KOS. So in a series judged normal an
image is flagged only below the station's image edge L_img: the outlier rule again, on the
kept learning series' lowest referred scores, each taken under a reference fitted on the
other kept series, and never above L (:func:`image_edge`). That leaves 8.9% / 9.7% of the
normal series with a flagged image, and 90.0% / 91.4% of a motion block's images flagged
where all below L gave 93.4% / 93.4% (node/models/README.md). An image lying further out
than the learning series' lowest images do (a spike, a slice with motion) is still flagged
in a series otherwise normal. References calibrated before revision 0019 have no image edge
and flag every image below L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
#: The low quantile of a series' slice scores that catches a bad block in it: the outlier rule
#: looks at it in the learning series, and a calibrated station judges each series by it.
SERIES_LOW_QUANTILE = 0.1
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
    FLAGGED = "flagged"  # a flag confirmed, or reported a missed artifact: never used


class ReferenceRefused(ValueError):
    """The learning series give no usable reference (the message says why)."""


@dataclass(frozen=True)
class LearningSeries:
    """One learning series: its foreground slice scores (the bundle's own score, before any
    station reference) and its review."""

    series_id: int
    scores: np.ndarray
    review: Review = Review.NONE
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
        excluded: confirmed flags and reported misses, and series with no foreground slice.
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
        series_edge: E, a series is abnormal when its :func:`series_statistic` lies below it
            (:func:`outlier_edge` of the kept series' own, each left out); None from a single
            kept series (the routing rule's slice count then judges).
        series_flagged: kept series that a reference built from the other kept series flags
            (leave one out; the module docstring).
        image_edge: L_img, the referred score below which an image of a series judged
            normal is flagged (:func:`image_edge`); None from a single kept series (every
            image below ``low`` is flagged).
    """

    centre: float
    low: float
    selection: Selection
    slices: int
    position: PositionReference
    series_edge: float | None = None
    series_flagged: int = 0
    image_edge: float | None = None


def series_summary(scores: np.ndarray) -> tuple[float, float]:
    """(median, 10th percentile) of one series' foreground slice scores."""
    values = np.asarray(scores, dtype=np.float64)
    return float(np.median(values)), series_statistic(values)


def outlier_edge(values: Sequence[float] | np.ndarray) -> float:
    """The value below which one of ``values`` is a low outlier: their median minus
    ``OUTLIER_Z`` robust standard deviations (``MAD_TO_SD`` median absolute deviations each;
    with no spread, more than half of them equal, the median itself)."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    return median - OUTLIER_Z * MAD_TO_SD * float(np.median(np.abs(values - median)))


def low_outliers(values: np.ndarray) -> np.ndarray:
    """Which values lie below :func:`outlier_edge` of them all."""
    values = np.asarray(values, dtype=np.float64)
    return values < outlier_edge(values)


def series_statistic(referred: np.ndarray) -> float:
    """What a calibrated station judges a series by: the ``SERIES_LOW_QUANTILE`` (10th)
    percentile of its referred foreground scores."""
    return float(np.quantile(np.asarray(referred, dtype=np.float64), SERIES_LOW_QUANTILE))


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


def _fit(kept: Sequence[LearningSeries], target_fpr: float) -> tuple[PositionReference, float]:
    """The position reference of ``kept`` and its low (``LOW_SHARE * target_fpr``)."""
    position = PositionReference.fit(kept)
    referred = np.concatenate([position.refer(s.scores, s.positions) for s in kept])
    return position, float(np.quantile(referred, LOW_SHARE * target_fpr))


def _statistic(series: LearningSeries, position: PositionReference) -> float:
    return series_statistic(position.refer(series.scores, series.positions))


def _left_out(kept: Sequence[LearningSeries]) -> list[PositionReference]:
    """For each kept series, the position reference fitted on the other kept series."""
    return [PositionReference.fit([*kept[:k], *kept[k + 1:]]) for k in range(len(kept))]


def _left_out_edge(kept: Sequence[LearningSeries], fits: Sequence[PositionReference],
                   statistic: Callable[[np.ndarray], float]) -> float | None:
    """:func:`outlier_edge` of ``statistic`` of each kept series' scores referred by the
    reference fitted on the other kept series (``fits``, in the same order), as a new series
    would be judged; None for fewer than two kept series."""
    if len(kept) < 2:
        return None
    return outlier_edge([float(statistic(fit.refer(own.scores, own.positions)))
                         for own, fit in zip(kept, fits, strict=True)])


def _edge(kept: Sequence[LearningSeries],
          left_out: Sequence[PositionReference] | None = None) -> float | None:
    """The series edge learned from ``kept``: :func:`_left_out_edge` of their
    :func:`series_statistic` (``left_out``: the references of the others, when already
    fitted; None for a single series)."""
    if len(kept) < 2:
        return None
    fits = _left_out(kept) if left_out is None else left_out
    return _left_out_edge(kept, fits, series_statistic)


def image_edge(kept: Sequence[LearningSeries], left_out: Sequence[PositionReference],
               low: float) -> float | None:
    """L_img: :func:`_left_out_edge` of the kept series' lowest referred scores, never above
    ``low``; None for fewer than two kept series."""
    edge = _left_out_edge(kept, left_out, np.min)
    return None if edge is None else min(low, edge)


def build_reference(series: Sequence[LearningSeries], target_fpr: float, *,
                    estimate: bool = True) -> Reference:
    """The station's position reference, centre, low, series edge and image edge from its
    learning series; with ``estimate``, also ``series_flagged`` (a reference and its edge for each
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
                               f"({len(selection.excluded)} confirmed flags, reported "
                               "misses or empty)")
    position, low = _fit(kept, target_fpr)
    centre = float(np.median([np.median(position.refer(s.scores, s.positions))
                              for s in kept]))
    if not (np.isfinite(centre) and np.isfinite(low)) or centre - low <= 0.0:
        raise ReferenceRefused(f"the station's low ({low:.6g}) is not below its centre "
                               f"({centre:.6g}): its series give no spread to map")
    left_out = _left_out(kept) if len(kept) > 1 else []
    flagged = 0
    if estimate and left_out:
        for k, (own, fit) in enumerate(zip(kept, left_out, strict=True)):
            edge = _edge([*kept[:k], *kept[k + 1:]])
            if edge is not None:
                flagged += _statistic(own, fit) < edge
    slices = int(sum(np.asarray(s.scores).size for s in kept))
    return Reference(centre, low, selection, slices, position, _edge(kept, left_out), flagged,
                     image_edge(kept, left_out, low))


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
