"""The arithmetic of a station's reference: scores referred to their slice position, robust to
a few bad learning series, reviews take precedence, a series edge and an image edge learned
with each series left out, and a reference with no spread is refused."""

from __future__ import annotations

import numpy as np
import pytest

from node.worker.learning import (
    LOW_SHARE,
    MAD_TO_SD,
    OUTLIER_Z,
    POSITION_BINS,
    LearningSeries,
    PositionReference,
    Reference,
    ReferenceRefused,
    Review,
    build_reference,
    low_outliers,
    map_scores,
    outlier_edge,
    select_series,
    series_statistic,
    stack_positions,
)

#: A station's normal slices: series centres spread by SERIES_SD, slices by SLICE_SD (nats).
SERIES_SD, SLICE_SD = 400.0, 1500.0
SLICES = 110


def normal_site(n: int, seed: int = 0, centre: float = -5000.0) -> list[LearningSeries]:
    """n normal series of one simulated station (heavy-ish lower tail, as slice scores have)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mu = centre + rng.normal(0.0, SERIES_SD)
        scores = mu + SLICE_SD * rng.standard_t(8, SLICES)
        out.append(LearningSeries(i, scores))
    return out


def motion_series(series_id: int, seed: int) -> LearningSeries:
    """A whole series with motion: every slice far below normal, widely spread."""
    rng = np.random.default_rng(seed)
    return LearningSeries(series_id, -5000.0 - 12000.0 + 4000.0 * rng.standard_normal(SLICES))


def bad_block_series(series_id: int, seed: int) -> LearningSeries:
    """A normal series but for a block of 20 slices far below normal."""
    rng = np.random.default_rng(seed)
    scores = -5000.0 + SLICE_SD * rng.standard_t(8, SLICES)
    scores[40:60] -= 20000.0
    return LearningSeries(series_id, scores)


def all_used(series: list[LearningSeries]) -> Reference:
    """The reference with every series used (each reviewed normal: none trimmed)."""
    return build_reference([LearningSeries(s.series_id, s.scores, Review.NORMAL)
                            for s in series], 0.01, estimate=False)


def statistic(series: LearningSeries, reference: Reference) -> float:
    """The series' 10th percentile, its scores referred by ``reference``."""
    return series_statistic(reference.position.refer(series.scores, series.positions))


def test_a_few_bad_series_among_twenty_do_not_move_the_reference() -> None:
    clean = normal_site(20)
    reference = build_reference(clean, 0.01)
    # Two of the 20 replaced: one whole series with motion, one with a bad block.
    spoiled = [*clean[:18], motion_series(18, 1), bad_block_series(19, 2)]
    robust = build_reference(spoiled, 0.01)
    assert set(robust.selection.trimmed) >= {18, 19}
    assert abs(robust.centre - reference.centre) < 0.25 * SERIES_SD
    assert abs(robust.low - reference.low) < 0.1 * (reference.centre - reference.low)
    # Without the trimming the low would have moved far: the test can tell.
    assert all_used(spoiled).low < reference.low - 0.5 * (reference.centre - reference.low)


def test_only_outliers_below_the_other_series_are_trimmed_by_median_or_low_quantile() -> None:
    # Series whose slice scores are one pattern shifted: median and 10th percentile shift too.
    pattern = np.linspace(-3000.0, 3000.0, 101)
    shifts = [0.0, 100.0, -100.0, 200.0, -200.0, 300.0, -300.0, 400.0, -400.0]
    # With the two below: median -100, median absolute deviation 300, so the edge lies at
    # -100 - 3.5 * 1.4826 * 300 = -1656.7.
    edge = -100.0 - OUTLIER_Z * MAD_TO_SD * 300.0
    assert -1700.0 < edge < -1600.0
    site = [LearningSeries(i, pattern + d) for i, d in enumerate(shifts)]
    inside = LearningSeries(9, pattern - 1500.0)
    beyond = LearningSeries(10, pattern - 3000.0)
    selection = select_series([*site, inside, beyond])
    assert selection.trimmed == (10,)
    assert sorted(selection.kept) == list(range(10))
    # A series normal at its median but with a bad block low in it: its 10th percentile.
    block = pattern.copy()
    block[:15] -= 50000.0
    assert select_series([*site, LearningSeries(11, block)]).trimmed == (11,)
    assert np.median(block) == pytest.approx(np.median(pattern))
    # A station's ordinary spread of subjects is kept whole: nothing trimmed from 20 normal.
    assert select_series(normal_site(20, seed=3)).trimmed == ()


def test_reviews_take_precedence_over_the_trimming() -> None:
    site = normal_site(20, seed=4)
    worst = motion_series(5, 7)
    series = [worst if s.series_id == 5 else s for s in site]
    assert 5 in select_series(series).trimmed
    # A reviewer marked the worst one a false alarm (normal): always used, never trimmed.
    reviewed = [LearningSeries(5, worst.scores, Review.NORMAL) if s.series_id == 5 else s
                for s in series]
    selection = select_series(reviewed)
    assert 5 in selection.kept and 5 not in selection.trimmed
    assert build_reference(reviewed, 0.01).slices == build_reference(series, 0.01).slices + SLICES
    # A confirmed flag is never used, however normal its slices look.
    flagged = [LearningSeries(3, s.scores, Review.FLAGGED) if s.series_id == 3 else s
               for s in series]
    selection = select_series(flagged)
    assert selection.excluded == (3,) and 3 not in selection.kept
    assert 3 not in selection.trimmed


def test_a_reference_without_spread_is_refused() -> None:
    flat = [LearningSeries(i, np.full(50, -4000.0)) for i in range(5)]
    with pytest.raises(ReferenceRefused, match="not below its centre"):
        build_reference(flat, 0.01)
    confirmed = [LearningSeries(i, np.linspace(-9000, -1000, 50), Review.FLAGGED)
                 for i in range(3)]
    with pytest.raises(ReferenceRefused, match="none of the 3"):
        build_reference(confirmed, 0.01)
    # One series with one slice per position bin: no spread within a bin to map.
    alone = [LearningSeries(0, np.array([])), LearningSeries(1, np.linspace(-9, -1, 9))]
    with pytest.raises(ReferenceRefused, match="not below its centre"):
        build_reference(alone, 0.01)
    empty = [LearningSeries(0, np.array([])), *normal_site(3, seed=1)[1:]]
    assert build_reference(empty, 0.01).selection.excluded == (0,)


def test_the_mapping_puts_the_station_centre_and_low_on_the_bundle_median_and_threshold() -> None:
    centre, low, median, threshold = -30000.0, -80000.0, -2400.0, -36000.0
    mapped = map_scores(np.array([centre, low, centre - 2 * (centre - low)]), centre, low,
                        median, threshold)
    assert mapped[0] == pytest.approx(median) and mapped[1] == pytest.approx(threshold)
    assert mapped[2] == pytest.approx(median - 2 * (median - threshold))
    with pytest.raises(ValueError):
        map_scores(np.zeros(2), centre=1.0, low=1.0, median=median, threshold=threshold)
    # About half the target rate of the station's own normal slices falls below the
    # threshold, referred to their positions (LOW_SHARE; fresh series pay for the bins).
    site = normal_site(20, seed=5, centre=-30000.0)
    ref = build_reference(site, 0.01)
    fresh = normal_site(20, seed=6, centre=-30000.0)
    referred = np.concatenate([ref.position.refer(s.scores, s.positions) for s in fresh])
    rate = float(np.mean(map_scores(referred, ref.centre, ref.low, median, threshold)
                         < threshold))
    assert LOW_SHARE * 0.01 / 4 < rate < 0.02


def test_each_score_is_referred_to_the_normal_at_its_position() -> None:
    """Normal scores that fall towards the ends of the head: a slice in the middle as low as
    a normal end slice is flagged, the end slice is not; without the positions both would be
    alike."""
    rng = np.random.default_rng(8)
    shape = -4000.0 * np.linspace(-1.0, 1.0, SLICES) ** 2
    site = [LearningSeries(i, shape + rng.normal(0.0, 100.0) + 150.0 * rng.standard_normal(
        SLICES)) for i in range(20)]
    ref = build_reference(site, 0.01)
    assert len(ref.position.levels) == len(ref.position.spreads) == POSITION_BINS
    assert ref.position.levels[0] < ref.position.levels[POSITION_BINS // 2] - 2000.0
    probe = shape.copy()
    probe[SLICES // 2] = shape[0]  # the middle slice scored as a normal end slice
    flags = ref.position.refer(probe, LearningSeries(99, probe).positions) < ref.low
    assert flags[SLICES // 2] and not flags[0]
    assert int(flags.sum()) == 1


def test_positions_run_along_each_stack_and_its_foreground() -> None:
    stacks = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    foreground = np.array([False, True, True, True, False, True, False, True])
    pos = stack_positions(stacks, foreground)
    # Stack 0's foreground from 0 to 1, its background slices at the nearest end; stack 1
    # on its own, its background slice between its neighbours.
    assert pos.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0])
    assert stack_positions(np.zeros(2, dtype=np.int64),
                           np.zeros(2, dtype=bool)).tolist() == [0.5, 0.5]
    ref = PositionReference((0.0, 10.0), (1.0, 2.0))
    assert ref.refer(np.array([1.0, 14.0]), np.array([0.2, 0.9])).tolist() == [1.0, 2.0]


def test_the_outlier_edge_is_the_median_less_three_and_a_half_robust_deviations() -> None:
    values = np.array([0.0, 1.0, 2.0, 3.0, 4.0, -100.0])
    # Median 1.5, median absolute deviation 1.5.
    assert outlier_edge(values) == pytest.approx(1.5 - OUTLIER_Z * MAD_TO_SD * 1.5)
    assert low_outliers(values).tolist() == [False] * 5 + [True]
    # No spread (more than half equal): below the median is out.
    assert outlier_edge([5.0, 5.0, 5.0, 1.0]) == 5.0
    assert series_statistic(np.arange(11.0)) == pytest.approx(1.0)


#: Where a low series' dips lie: one in each tenth of the stack, so that no position bin of
#: the station's normal is made of them.
DIPS = tuple(range(5, SLICES, 10))


def dipped(series_id: int, rng: np.random.Generator, review: Review = Review.NONE,
           ) -> LearningSeries:
    """A series whose tenth of slices, one per position bin, lies far below the rest."""
    scores = -5000.0 + 300.0 * rng.standard_normal(SLICES)
    scores[list(DIPS)] = -9000.0 - 10.0 * np.arange(len(DIPS))
    return LearningSeries(series_id, scores, review)


def calm_site(n: int, seed: int) -> list[LearningSeries]:
    rng = np.random.default_rng(seed)
    return [LearningSeries(i, -5000.0 + 300.0 * rng.standard_normal(SLICES)) for i in range(n)]


def left_out(kept: list[LearningSeries]) -> list[tuple[LearningSeries, Reference]]:
    """Each kept series with the reference built from the other kept ones."""
    return [(s, build_reference([o for o in kept if o is not s], 0.01, estimate=False))
            for s in kept]


def test_the_series_edge_comes_from_the_kept_series_each_left_out() -> None:
    """E is the outlier edge of the kept series' own 10th percentiles, each referred by the
    reference of the others (a trimmed series not among them); a fresh normal series lies
    above it, one with a tenth of its slices far down below it."""
    series = [*calm_site(20, seed=3), motion_series(20, 5)]
    reference = build_reference(series, 0.01)
    assert reference.selection.trimmed == (20,)
    own = [statistic(s, others) for s, others in left_out(series[:20])]
    assert reference.series_edge == pytest.approx(outlier_edge(own))
    edge = reference.series_edge
    assert edge is not None
    fresh = calm_site(5, seed=9)
    assert all(statistic(s, reference) >= edge for s in fresh)
    assert statistic(dipped(99, np.random.default_rng(1)), reference) < edge
    # A single kept series gives no edge (the routing rule's count then judges).
    assert build_reference(series[:1], 0.01).series_edge is None


def test_the_reference_counts_the_series_it_flags_with_each_left_out() -> None:
    """Each kept series is judged by a reference built from the other kept ones (its bins
    and edge); trimmed series are not counted. Two low series that reviewers marked normal
    are kept, and each, left out, is flagged by the others' edge."""
    rng = np.random.default_rng(4)
    site = [*calm_site(18, seed=4), dipped(18, rng, Review.NORMAL),
            dipped(19, rng, Review.NORMAL)]
    reference = build_reference(site, 0.01)
    assert reference.selection.trimmed == ()
    flagged = [s.series_id for s, others in left_out(site)
               if others.series_edge is not None and statistic(s, others) < others.series_edge]
    assert reference.series_flagged == len(flagged)
    assert {18, 19} <= set(flagged)
    # Without the estimate (a bench's reference) nothing is counted.
    assert build_reference(site, 0.01, estimate=False).series_flagged == 0


def test_the_image_edge_comes_from_the_kept_series_lowest_images_each_left_out() -> None:
    """L_img is the outlier edge of the kept series' lowest referred scores, each referred by
    the reference of the others (the whole-motion series trimmed, not among them), never
    above the low; fresh normal series have an image below it far less often than below the
    low, a bad block's images all lie below it."""
    series = [*normal_site(20, seed=6), motion_series(20, 5)]
    reference = build_reference(series, 0.01)
    assert reference.selection.trimmed == (20,)
    lowest = [float(np.min(others.position.refer(s.scores, s.positions)))
              for s, others in left_out(series[:20])]
    assert reference.image_edge == pytest.approx(min(reference.low, outlier_edge(lowest)))
    edge = reference.image_edge
    assert edge is not None and edge < reference.low
    # Of fresh normal series, far fewer have an image below the edge than below the low.
    fresh = normal_site(200, seed=11)
    referred = [reference.position.refer(s.scores, s.positions) for s in fresh]
    below_low = np.mean([bool(np.any(r < reference.low)) for r in referred])
    below_edge = np.mean([bool(np.any(r < edge)) for r in referred])
    assert below_edge < 0.5 * below_low
    # An image of a bad block lies below it: a spike or a moving slice is still flagged.
    block = bad_block_series(99, 2)
    assert np.all(reference.position.refer(block.scores, block.positions)[40:60] < edge)
    # A single kept series gives none: every image below the low is flagged.
    assert build_reference(series[:1], 0.01).image_edge is None
