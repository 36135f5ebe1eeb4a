"""The arithmetic of a station's reference: scores referred to their slice position, robust to
a few bad learning series, reviews take precedence, a series count learned with each series
left out, and a reference with no spread is refused."""

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
    learned_min_flagged,
    map_scores,
    select_series,
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


def below(series: LearningSeries, reference: Reference) -> int:
    """The series' slices below the reference's low, referred to their positions."""
    return int(np.sum(reference.position.refer(series.scores, series.positions)
                      < reference.low))


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


def test_the_series_count_is_one_more_than_the_second_most_low_slices() -> None:
    """One bad series among the counts does not set it; too few series give no count."""
    assert learned_min_flagged([0, 0, 5, 3, 1]) == 4
    assert learned_min_flagged([40, 2, 2, 0]) == 3
    assert learned_min_flagged([0] * 19) == 1
    assert learned_min_flagged([7]) == learned_min_flagged([]) == 1


#: Where a low subject's dips lie: spread over the stack, a few per position bin at most.
DIPS = (5, 33, 61, 89, 19, 75)


def dipped_site() -> list[LearningSeries]:
    """20 normal series, three with four slices far below the others (a station's low
    subjects), one with two; and a whole series with motion."""
    rng = np.random.default_rng(3)
    series = []
    for i in range(20):
        scores = -5000.0 + 300.0 * rng.standard_normal(SLICES)
        dips = DIPS[:4] if i < 3 else DIPS[:2] if i == 3 else ()
        scores[list(dips)] = -9000.0 - 10.0 * np.arange(len(dips))
        series.append(LearningSeries(i, scores, min_flagged=3))
    series.append(motion_series(20, 5))  # trimmed, though every slice is below the low
    return series


def left_out(kept: list[LearningSeries]) -> list[tuple[LearningSeries, Reference]]:
    """Each kept series with the reference built from the other kept ones."""
    return [(s, build_reference([o for o in kept if o is not s], 0.01, estimate=False))
            for s in kept]


def test_the_reference_learns_how_many_low_slices_its_normal_series_have() -> None:
    """The count comes from the kept series' slices below the low of the other kept series,
    trimmed ones not counted: the three series with four dips set it above the routing
    rule's three."""
    series = dipped_site()
    reference = build_reference(series, 0.01)
    assert reference.selection.trimmed == (20,)
    counts = [below(s, others) for s, others in left_out(series[:20])]
    # The four-dip series' dips lie below the others' low (the others then hold 8 such dips
    # and one two-dip series among 2,090 slices, about the 0.5% quantile's 10).
    assert all(counts[i] >= 4 for i in range(3))
    assert reference.min_flagged == learned_min_flagged(counts) == 1 + sorted(counts)[-2] >= 5
    # Counted in sample instead, the series' own dips pull the low down towards them.
    assert sum(below(s, reference) for s in series[:3]) < sum(counts[:3])


def test_the_reference_counts_the_series_it_flags_with_each_left_out() -> None:
    """Each kept series is judged by a reference built from the other kept ones (their bins,
    low and count, the series' own routing rule as the floor); trimmed series are not
    counted. Left out in turn, only series with dips can be flagged."""
    series = dipped_site()
    reference = build_reference(series, 0.01)
    kept = [series[i] for i in reference.selection.kept]
    flagged = []
    for s, others in left_out(kept):
        assert others.selection.trimmed == ()
        if below(s, others) >= max(s.min_flagged, others.min_flagged):
            flagged.append(s.series_id)
    assert reference.series_flagged == len(flagged)
    assert set(flagged) <= {0, 1, 2}
    # Two series with six dips each: the count is learned above them, but each, left out,
    # is flagged by the other series' reference (whose count the other one sets lower).
    rng = np.random.default_rng(4)
    pair = []
    for i in range(20):
        scores = -5000.0 + 300.0 * rng.standard_normal(SLICES)
        if i < 2:
            scores[list(DIPS)] = -9000.0 - 10.0 * np.arange(len(DIPS))
        pair.append(LearningSeries(i, scores, min_flagged=3))
    both = build_reference(pair, 0.01)
    assert both.min_flagged >= 7
    assert both.series_flagged >= 2
    # The routing rule stays the floor: with 10 slices needed, none of them is flagged.
    strict = [LearningSeries(s.series_id, s.scores, min_flagged=10) for s in series]
    assert build_reference(strict, 0.01).series_flagged == 0
    # Without the estimate (a bench's reference) nothing is counted.
    assert build_reference(pair, 0.01, estimate=False).series_flagged == 0
