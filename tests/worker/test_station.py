"""Station references in a real migrated database: the key, calibration exactly once when the
N-th learning series is stored, refusal, judging after calibration, restart, and the series
a station offers as normal training data."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings, LearningSettings
from node.queue import references as refs
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import alembic_config, current_revision, head_revision, upgrade
from node.queue.models import AdminAction, Series, SliceScore, StationReference, utcnow
from node.report.content import SliceVerdict
from node.worker import station as station_module
from node.worker.learning import (
    LearningSeries,
    Review,
    build_reference,
    select_series,
)
from node.worker.station import (
    BundleScale,
    apply_reference,
    judge,
    normal_series_folders,
    recalibrate,
    settle_reference,
)
from tests.helpers.db import insert_done_series, migrated_database
from tests.helpers.learning import KEY, add_learning_series, site_scores

LEARN = LearningSettings(series=5)
#: The stack of each of the judged test series' slices: one stack.
STACK = [0, 0, 0, 0]
QUANTILES = tuple(float(q) for q in np.linspace(-60000.0, 10000.0, 201))
SCALE = BundleScale("brain-t1", "0.1.0", threshold=-36000.0, median=float(QUANTILES[100]),
                    target_fpr=0.01, quantiles=QUANTILES)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'q.db'}")) as f:
        yield f


def _reference(factory: sessionmaker[Session], key: refs.StationKey = KEY) -> StationReference:
    with factory() as session:
        return refs.ensure_reference(session, key)


def _settle(factory: sessionmaker[Session], reference_id: int) -> bool:
    with factory() as session, session.begin():
        return settle_reference(session, LEARN, reference_id, SCALE)


def _row(factory: sessionmaker[Session], reference_id: int) -> StationReference:
    with factory() as session:
        row = session.get(StationReference, reference_id)
        assert row is not None
        return row


def test_the_station_key_normalizes_the_protocol_and_falls_back_to_the_calling_aet() -> None:
    key = refs.station_key(station_name=" MR  ROOM 3 ", calling_aet="GATEWAY",
                           scanner_model="Prisma", series_description="  T1  MPRAGE\tSag ",
                           model_name="brain-t1", model_version="0.1.0")
    assert key is not None
    assert (key.station, key.station_source, key.protocol) == (
        "MR ROOM 3", "station_name", "t1 mprage sag")
    by_aet = refs.station_key(station_name=None, calling_aet="MR3", scanner_model=None,
                              series_description=None, model_name="m", model_version="1")
    assert by_aet is not None
    assert (by_aet.station, by_aet.station_source, by_aet.protocol) == ("MR3", "calling_aet", "")
    assert refs.station_key(station_name="", calling_aet=None, scanner_model=None,
                            series_description="x", model_name="m", model_version="1") is None


def test_calibrates_once_when_the_nth_learning_series_is_stored(
    factory: sessionmaker[Session],
) -> None:
    reference = _reference(factory)
    assert reference.state == refs.LEARNING
    site = site_scores(5, seed=1)
    ids = [add_learning_series(factory, reference.id, s) for s in site[:4]]
    assert not _settle(factory, reference.id)
    assert _row(factory, reference.id).state == refs.LEARNING
    # A series judged by another reference, or still processing, does not count.
    other = _reference(factory, refs.StationKey(**{**KEY.__dict__, "protocol": "other"}))
    add_learning_series(factory, other.id, site[4])
    assert not _settle(factory, reference.id)
    ids.append(add_learning_series(factory, reference.id, site[4]))
    assert _settle(factory, reference.id)
    row = _row(factory, reference.id)
    expected = build_reference([LearningSeries(i, s) for i, s in zip(ids, site, strict=True)],
                               0.01)
    assert row.state == refs.CALIBRATED and row.calibrated_at is not None
    # The background slices' (meaningless, very low) scores were left out.
    assert row.centre == pytest.approx(expected.centre)
    assert row.low == pytest.approx(expected.low)
    assert (row.series_used, row.series_trimmed, row.slices) == (
        len(expected.selection.kept), len(expected.selection.trimmed), expected.slices)
    assert expected.slices == 60 * len(expected.selection.kept)
    # The series edge its series are judged against, and how many of its learning series a
    # reference built from the others flags: as the arithmetic says (no slice count).
    assert expected.series_edge is not None
    assert row.series_edge == pytest.approx(expected.series_edge)
    assert row.series_flagged == expected.series_flagged
    assert row.min_flagged is None
    # And the image edge the images of a series it judges normal are judged against.
    assert expected.image_edge is not None and expected.image_edge <= expected.low
    assert row.image_edge == pytest.approx(expected.image_edge)
    # The station's normal per slice position, as the arithmetic fitted it.
    assert row.position_levels == pytest.approx(list(expected.position.levels))
    assert row.position_spreads == pytest.approx(list(expected.position.spreads))
    assert (row.bundle_median, row.bundle_threshold) == (SCALE.median, SCALE.threshold)
    # Exactly once: a later learning series (raced past the lock) does not rebuild it.
    add_learning_series(factory, reference.id, site[0] - 50000.0)
    assert not _settle(factory, reference.id)
    assert _row(factory, reference.id).low == pytest.approx(expected.low)


def test_a_reviewed_false_alarm_is_used_and_a_confirmed_flag_is_not(
    factory: sessionmaker[Session],
) -> None:
    reference = _reference(factory)
    site = site_scores(5, seed=2)
    ids = [add_learning_series(factory, reference.id, s) for s in site[:3]]
    bad = add_learning_series(factory, reference.id, site[3] - 20000.0, abnormal=True)
    confirmed = add_learning_series(factory, reference.id, site[4], abnormal=True)
    with factory.begin() as session:
        session.execute(insert(AdminAction), [
            {"series_id": bad, "actor": "dr", "action": "false_alarm", "at": utcnow()},
            {"series_id": confirmed, "actor": "dr", "action": "confirm", "at": utcnow()}])
    assert _settle(factory, reference.id)
    row = _row(factory, reference.id)
    assert (row.series_used, row.series_trimmed, row.series_excluded) == (4, 0, 1)
    used = [LearningSeries(i, s) for i, s in zip([*ids, bad], [*site[:3], site[3] - 20000.0],
                                                  strict=True)]
    # Unreviewed, the false alarm would have been left out as an outlier; reviewed, it counts.
    assert select_series(used).trimmed == (bad,)
    reviewed = [LearningSeries(s.series_id, s.scores, Review.NORMAL) for s in used]
    assert row.low == pytest.approx(build_reference(reviewed, 0.01).low)


def test_the_reference_records_which_learning_series_it_used_and_left_out(
    factory: sessionmaker[Session],
) -> None:
    """An admin auditing a calibrated station sees each learning series' role: used, left
    out as an outlier below the others, or excluded as a confirmed flag."""
    reference = _reference(factory)
    site = site_scores(5, seed=2)
    ids = [add_learning_series(factory, reference.id, s) for s in site[:3]]
    bad = add_learning_series(factory, reference.id, site[3] - 20000.0, abnormal=True)
    confirmed = add_learning_series(factory, reference.id, site[4], abnormal=True)
    with factory.begin() as session:
        session.execute(insert(AdminAction), [
            {"series_id": confirmed, "actor": "dr", "action": "confirm", "at": utcnow()}])
    with factory() as session:
        assert [s.role for s in refs.learned_series(session, reference.id, None)] == [None] * 5
    assert _settle(factory, reference.id)
    row = _row(factory, reference.id)
    assert row.learned_from == {refs.USED: ids, refs.OUTLIER: [bad], refs.EXCLUDED: [confirmed]}
    assert (row.series_used, row.series_trimmed, row.series_excluded) == (3, 1, 1)
    # A learning series scored after calibration (raced past the lock) is listed, not used.
    late = add_learning_series(factory, reference.id, site[0])
    with factory() as session:
        listed = refs.learned_series(session, reference.id, row.learned_from)
        view = next(v for v in refs.reference_views(session) if v.id == reference.id)
    assert view.learned_from == row.learned_from
    assert [(s.series_id, s.role) for s in listed] == [
        *[(i, refs.USED) for i in ids], (bad, refs.OUTLIER), (confirmed, refs.EXCLUDED),
        (late, None)]
    assert [(s.abnormal, s.review) for s in listed[3:5]] == [(True, None), (True, "confirm")]
    assert all(s.series_instance_uid and not s.purged for s in listed)


def test_a_series_reported_as_a_missed_artifact_is_never_used(
    factory: sessionmaker[Session],
) -> None:
    """Out of the box the default bundle sees no motion, so a bad learning series is judged
    normal; a reviewer's "missed artifact" keeps it out as a confirmed flag would, although it
    is no outlier, and a later "confirm" of its normal verdict takes it back."""
    reference = _reference(factory)
    site = site_scores(5, seed=6)
    ids = [add_learning_series(factory, reference.id, s) for s in site]
    with factory.begin() as session:
        session.execute(insert(AdminAction), [
            {"series_id": ids[1], "actor": "dr", "action": "missed", "at": utcnow()}])
    assert select_series([LearningSeries(i, s) for i, s in zip(ids, site, strict=True)]
                         ).trimmed == ()
    assert _settle(factory, reference.id)
    row = _row(factory, reference.id)
    assert row.learned_from == {refs.USED: [ids[0], *ids[2:]], refs.OUTLIER: [],
                                refs.EXCLUDED: [ids[1]]}
    with factory() as session:
        assert [s.review for s in refs.learned_series(session, reference.id,
                                                       row.learned_from)][1] == "missed"
        session.execute(insert(AdminAction), [
            {"series_id": ids[1], "actor": "dr", "action": "confirm", "at": utcnow()}])
        assert select_series(station_module._learning_series(session, reference.id)
                             ).excluded == ()


def test_recalibrate_rebuilds_from_the_same_series_with_todays_reviews(
    factory: sessionmaker[Session],
) -> None:
    """A bad learning series judged normal (a low block in 5 of its 60 slices, no outlier
    by its median or 10th percentile) is used and widens the station's spread there; reported
    as missed, a recalibration leaves it out at once: the same arithmetic on the same series
    with the review, no new series needed; the old reference is kept."""
    reference = _reference(factory)
    site = site_scores(5, seed=6)
    bad = site[2].copy()
    bad[20:25] -= 9000.0
    series = [*site[:2], bad, *site[3:]]
    ids = [add_learning_series(factory, reference.id, s) for s in series]
    assert _settle(factory, reference.id)
    before = _row(factory, reference.id)
    assert before.learned_from is not None and ids[2] in before.learned_from[refs.USED]
    with factory() as session:
        with pytest.raises(ValueError, match="still learning"):
            recalibrate(session, LEARN, _reference(factory, refs.StationKey(
                **{**KEY.__dict__, "protocol": "other"})).id, actor="cli:ops")
        session.execute(insert(AdminAction), [
            {"series_id": ids[2], "actor": "dr", "action": "missed", "at": utcnow()}])
        session.commit()
        new, calibrated = recalibrate(session, LEARN, reference.id, actor="admin:dr ada",
                                      note="motion in the 3rd learning series")
    assert calibrated and new.id != reference.id
    old, row = _row(factory, reference.id), _row(factory, new.id)
    assert (old.state, old.superseded_by, old.superseded_note) == (
        refs.CALIBRATED, "admin:dr ada", "motion in the 3rd learning series")
    assert old.superseded_at is not None and old.learned_from == before.learned_from
    assert row.state == refs.CALIBRATED and row.superseded_at is None
    assert row.learned_from == {refs.USED: [*ids[:2], *ids[3:]], refs.OUTLIER: [],
                                refs.EXCLUDED: [ids[2]]}
    reviewed = [LearningSeries(i, s, Review.FLAGGED if i == ids[2] else Review.NONE)
                for i, s in zip(ids, series, strict=True)]
    expected = build_reference(reviewed, SCALE.target_fpr)
    assert row.low == pytest.approx(expected.low) and row.low != pytest.approx(before.low)
    assert row.position_spreads == pytest.approx(list(expected.position.spreads))
    assert row.series_edge == pytest.approx(expected.series_edge)
    # The scale it maps onto is the old reference's (the bundle's), read from its row.
    assert (row.bundle_median, row.bundle_threshold) == (SCALE.median, SCALE.threshold)
    with factory() as session:
        assert refs.learning_series_ids(session, new.id) == ids
        assert refs.learning_series_ids(session, reference.id) == []
        assert refs.current_reference(session, KEY).id == new.id  # type: ignore[union-attr]
        # The old one is no longer current: a second try is refused.
        with pytest.raises(ValueError, match="not current"):
            recalibrate(session, LEARN, reference.id, actor="cli:ops")


def test_no_spread_is_refused_with_a_reason_and_stays_learning(
    factory: sessionmaker[Session],
) -> None:
    reference = _reference(factory)
    for _ in range(5):
        add_learning_series(factory, reference.id, [-4000.0] * 30)
    assert not _settle(factory, reference.id)
    row = _row(factory, reference.id)
    assert row.state == refs.LEARNING
    assert row.note is not None and "not below its centre" in row.note


def _verdicts(scores: list[float], foreground: list[bool]) -> list[SliceVerdict]:
    return [SliceVerdict(sop_instance_uid=f"1.2.{k}", sop_class_uid="1.2.840", frame=None,
                         index=k, log_likelihood=s, kl=0.0, elbo=s, abnormal=False,
                         confidence=0.5, foreground=fg)
            for k, (s, fg) in enumerate(zip(scores, foreground, strict=True))]


def test_judged_out_of_the_box_while_learning_then_against_the_station(
    factory: sessionmaker[Session],
) -> None:
    slices = _verdicts([-5000.0, -7000.0, -20000.0, -60000.0], [True, True, True, False])
    first = judge(factory, LEARN, KEY, 99, slices, STACK, SCALE.threshold, SCALE)
    assert first.state == refs.LEARNING and first.slices == tuple(slices)
    assert first.note == "Reference: out of the box (station learning, 1 of 5 series)"
    for s in site_scores(5, seed=3):
        add_learning_series(factory, first.reference_id or 0, s)
    assert _settle(factory, first.reference_id or 0)
    then = judge(factory, LEARN, KEY, 99, slices, STACK, SCALE.threshold, SCALE)
    row = _row(factory, first.reference_id or 0)
    assert then.state == refs.CALIBRATED and then.reference_id == row.id
    assert row.series_edge is not None and row.min_flagged is None
    assert then.note == ("Reference: calibrated for station MR ROOM 3 (Prisma), protocol "
                         f"'t1 mprage sag', from {row.series_used} of 5 learning series on "
                         f"{row.calibrated_at:%Y-%m-%d}; each slice against the station's "
                         "normal at its position; the series abnormal when its "
                         "10th-percentile score lies below the station's series edge, below "
                         "which one of its learning series would have been an outlier; in a "
                         "series judged normal an image flagged only below the station's image "
                         "edge, below which one of its learning series' lowest images would "
                         "have been an outlier")
    # No learned count: the routing rule's; the series is judged by its 10th percentile.
    assert then.min_flagged is None and then.min_abnormal_slices(3) == 3
    assert first.min_flagged is None and first.min_abnormal_slices(3) == 3
    assert (first.series_score, first.series_edge) == (None, None)
    assert [s.bundle_score for s in then.slices] == [-5000.0, -7000.0, -20000.0, -60000.0]
    # Referred to their positions: the first foreground slice to the first bin's normal,
    # the third (the last foreground one) to the last bin's.
    assert row.position_levels is not None and row.position_spreads is not None
    levels, spreads = row.position_levels, row.position_spreads
    referred = np.array([(-5000.0 - levels[0]) / spreads[0],
                         (-20000.0 - levels[-1]) / spreads[-1]])
    expected = SCALE.median + (referred - row.centre) * (
        SCALE.median - SCALE.threshold) / (row.centre - row.low)
    assert [then.slices[0].log_likelihood, then.slices[2].log_likelihood] == pytest.approx(
        expected)
    # Near the station's centre: normal; far below its low: flagged; background: never.
    assert [s.abnormal for s in then.slices] == [False, False, True, False]
    # The series' score: the 10th percentile of its foreground slices' mapped scores; the
    # edge: the reference's, mapped the same way.
    fg = [s.log_likelihood for s in then.slices[:3]]
    assert then.series_score == pytest.approx(float(np.quantile(fg, 0.1)))
    assert then.series_edge == pytest.approx(SCALE.median + (row.series_edge - row.centre) * (
        SCALE.median - SCALE.threshold) / (row.centre - row.low))
    assert all(0.0 <= s.confidence <= 1.0 for s in then.slices)
    off = judge(factory, LearningSettings(enabled=False), KEY, 99, slices, STACK,
                SCALE.threshold, SCALE)
    assert (off.state, off.reference_id, off.slices) == (None, None, tuple(slices))
    assert off.note == "Reference: out of the box (station learning is off)"
    with pytest.raises(ValueError, match="not calibrated"):
        apply_reference(slices, STACK, _reference(factory, refs.StationKey(
            **{**KEY.__dict__, "model_version": "0.2.0"})), SCALE.threshold, QUANTILES)


def test_a_series_judged_normal_flags_only_images_below_the_image_edge(
    factory: sessionmaker[Session],
) -> None:
    """In a series the station judges abnormal every image below its low is flagged (where
    the bad block is); in one it judges normal only an image below its image edge, its
    confidence taken against that edge; a reference from before revision 0019 (no image
    edge) flags every image below its low either way."""
    reference_id = _reference(factory).id
    for s in site_scores(5, seed=3):
        add_learning_series(factory, reference_id, s)
    assert _settle(factory, reference_id)
    # Round numbers on the unreferred scale: s' = M + (s - C)(M - T)/(C - L).
    with factory.begin() as session:
        session.execute(update(StationReference).where(StationReference.id == reference_id)
                        .values(centre=-5000.0, low=-8000.0, series_edge=-9000.0,
                                image_edge=-12000.0, position_levels=None,
                                position_spreads=None))

    def mapped(s: float) -> float:
        return SCALE.median + (s - -5000.0) * (SCALE.median - SCALE.threshold) / 3000.0

    stack = [0] * 20
    # 18 images at the centre, one between the image edge and the low, one below the edge:
    # the 10th percentile lies near the centre, so the series is normal.
    normal = judge(factory, LEARN, KEY, 99, _verdicts([-5000.0] * 18 + [-10000.0, -15000.0],
                                                      [True] * 20), stack, SCALE.threshold,
                   SCALE)
    assert normal.series_score is not None and normal.series_edge is not None
    assert normal.series_score >= normal.series_edge == pytest.approx(mapped(-9000.0))
    assert normal.image_edge == pytest.approx(mapped(-12000.0))
    assert [s.abnormal for s in normal.slices] == [False] * 19 + [True]
    # Below the threshold, above the image edge: normal here, with its confidence taken
    # against the edge it was judged by (not 0 as against the threshold).
    between = normal.slices[18]
    assert normal.image_edge < between.log_likelihood < SCALE.threshold
    assert 0.0 < between.confidence <= 1.0
    # Six images between edge and low: the 10th percentile lies there, below the series
    # edge, so the series is abnormal and each of them is flagged.
    bad = judge(factory, LEARN, KEY, 99, _verdicts([-5000.0] * 14 + [-10000.0] * 6,
                                                   [True] * 20), stack, SCALE.threshold, SCALE)
    assert bad.series_score is not None and bad.series_edge is not None
    assert bad.series_score < bad.series_edge and bad.image_edge is None
    assert [s.abnormal for s in bad.slices] == [False] * 14 + [True] * 6
    # A reference calibrated before revision 0019: every image below the low, normal or not.
    with factory.begin() as session:
        session.execute(update(StationReference).where(StationReference.id == reference_id)
                        .values(image_edge=None))
    old = judge(factory, LEARN, KEY, 99, _verdicts([-5000.0] * 18 + [-10000.0, -15000.0],
                                                   [True] * 20), stack, SCALE.threshold, SCALE)
    assert old.image_edge is None and old.series_score is not None
    assert old.series_edge is not None and old.series_score >= old.series_edge
    assert [s.abnormal for s in old.slices] == [False] * 18 + [True, True]


def test_a_reference_calibrated_before_the_positions_judges_as_it_was_built(
    factory: sessionmaker[Session],
) -> None:
    """A reference calibrated before revision 0018 has no bins: its centre and low are on the
    unreferred scores, and it goes on judging those (a node upgraded in place); one with bins
    judges the same scores referred to their positions."""
    reference_id = _reference(factory).id
    for s in site_scores(5, seed=3):
        add_learning_series(factory, reference_id, s)
    assert _settle(factory, reference_id)
    slices = _verdicts([-5000.0, -9000.0, -5000.0, -60000.0], [True, True, True, False])
    referred = judge(factory, LEARN, KEY, 99, slices, STACK, SCALE.threshold, SCALE)
    with factory.begin() as session:
        session.execute(update(StationReference).where(StationReference.id == reference_id)
                        .values(centre=-5000.0, low=-8000.0, position_levels=None,
                                position_spreads=None, series_edge=None, min_flagged=4))
    old = judge(factory, LEARN, KEY, 99, slices, STACK, SCALE.threshold, SCALE)
    # Unreferred: s' = M + (s - C)(M - T)/(C - L) with the row's own C and L.
    expected = SCALE.median + (np.array([-5000.0, -9000.0]) + 5000.0) * (
        SCALE.median - SCALE.threshold) / 3000.0
    assert [old.slices[0].log_likelihood, old.slices[1].log_likelihood] == pytest.approx(
        expected)
    assert [s.abnormal for s in old.slices] == [False, True, False, False]
    # Judged by its count of slices below the low, not by a series edge.
    assert (old.min_flagged, old.series_score, old.series_edge) == (4, None, None)
    assert referred.series_edge is not None and referred.min_flagged is None
    assert "at its position" in referred.note and "at its position" not in old.note
    assert old.note.endswith("all but one of them had at most 3 slices below its low")
    assert [s.log_likelihood for s in referred.slices[:3]] != pytest.approx(
        [s.log_likelihood for s in old.slices[:3]])


def test_a_bundle_with_a_station_score_learns_and_judges_by_it(
    factory: sessionmaker[Session],
) -> None:
    """The reference is built from the station scores, not the bundle's own, and a calibrated
    station maps the station score; the report keeps the bundle's own score."""
    reference_id = _reference(factory).id
    for own, station in zip(site_scores(5, seed=3), site_scores(5, seed=4, centre=90000.0),
                            strict=True):
        add_learning_series(factory, reference_id, own, station_scores=station)
    assert _settle(factory, reference_id)
    row = _row(factory, reference_id)
    assert row.centre is not None and row.low is not None
    assert row.position_levels is not None and row.position_spreads is not None
    # The station scores' scale.
    assert 85000.0 < min(row.position_levels) <= max(row.position_levels) < 95000.0
    slices = [dataclasses.replace(v, station_score=st) for v, st in zip(
        _verdicts([-5000.0, -5000.0, -60000.0], [True, True, True]),
        [90000.0, 60000.0, 90000.0], strict=True)]
    judged = judge(factory, LEARN, KEY, 99, slices, [0] * 3, SCALE.threshold, SCALE)
    assert judged.state == refs.CALIBRATED
    # Normal on the bundle's own score but far below the station's low: flagged; the other
    # way round: normal. The bundle's own score is kept beside the mapped one.
    assert [s.abnormal for s in judged.slices] == [False, True, False]
    assert [s.bundle_score for s in judged.slices] == [-5000.0, -5000.0, -60000.0]
    referred = (90000.0 - row.position_levels[0]) / row.position_spreads[0]
    expected = SCALE.median + (referred - row.centre) * (SCALE.median - SCALE.threshold) / (
        row.centre - row.low)
    assert judged.slices[0].log_likelihood == pytest.approx(expected)


def test_restart_keeps_the_old_reference_and_learns_anew(factory: sessionmaker[Session]) -> None:
    reference = _reference(factory)
    for s in site_scores(5, seed=4):
        add_learning_series(factory, reference.id, s)
    assert _settle(factory, reference.id)
    other = _reference(factory, refs.StationKey(**{**KEY.__dict__, "protocol": "t2 axial"}))
    with factory() as session:
        assert refs.restart_learning(session, actor="cli:tech", station="mr room 3",
                                     protocol="Nothing like it") == []
        [new] = refs.restart_learning(session, actor="cli:tech", note="new head coil",
                                      station="mr  room 3", protocol=" T1 MPRAGE  sag")
    old = _row(factory, reference.id)
    assert old.state == refs.CALIBRATED and old.superseded_at is not None
    assert (old.superseded_by, old.superseded_note) == ("cli:tech", "new head coil")
    assert new.state == refs.LEARNING and refs.key_of(new) == KEY
    assert _reference(factory).id == new.id
    assert _row(factory, other.id).superseded_at is None
    with factory() as session:
        views = refs.reference_views(session)
        earlier = refs.reference_views(session, superseded=True)
    assert [(v.id, v.learned) for v in views] == [(new.id, 0), (other.id, 0)]
    assert [(v.id, v.learned, v.centre) for v in earlier] == [(old.id, 5, old.centre)]
    # One current row per key, whatever a second writer tries.
    with pytest.raises(IntegrityError), factory.begin() as session:
        session.add(StationReference(**{**KEY.__dict__, "state": "learning",
                                        "created_at": utcnow()}))


def test_two_workers_creating_a_station_get_one_reference(factory: sessionmaker[Session]) -> None:
    barrier = threading.Barrier(4)
    got: list[int] = []

    def create() -> None:
        barrier.wait()
        got.append(_reference(factory).id)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(StationReference)) == 1


def test_normal_series_folders_are_the_kept_stored_learning_series(
    factory: sessionmaker[Session], tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    reference = _reference(factory)
    site = site_scores(10, seed=5)
    site[2] = site[2] - 30000.0  # a bad one: trimmed
    ids = [add_learning_series(factory, reference.id, s, storage=storage) for s in site]
    kept = select_series([LearningSeries(i, v) for i, v in zip(ids, site, strict=True)]).kept
    assert ids[2] not in kept
    purged = kept[-1]
    with factory.begin() as session:
        session.execute(update(Series).where(Series.id == purged).values(purged_at=utcnow()))
    with factory() as session:
        folders = normal_series_folders(session, storage, "Mr Room 3")
        series = {s.id: s for s in session.scalars(select(Series))}
        assert normal_series_folders(session, storage, "MR ROOM 3", "t2 axial") == []
        assert normal_series_folders(session, storage, "MR ROOM 4") == []
    assert folders == [storage / series[i].study_instance_uid / series[i].series_instance_uid
                       for i in kept if i != purged]
    assert all(any(folder.glob("*.dcm")) for folder in folders)


def test_migration_0013_leaves_older_verdicts_as_they_were_and_goes_down_again(
    tmp_path: Path,
) -> None:
    """Rows scored before revision 0013 keep their verdict: no reference judged them (the
    model's own verdict), their slice rows say nothing of foreground or a station mapping;
    the downgrade drops the table and the columns, and the upgrade works again."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0012_alerts_problems")
    with sqlite3.connect(tmp_path / "old.db") as db:
        insert_done_series(db, 1, "1.2.3.1", "2026-11-20 08:00:00")
        db.execute("UPDATE series SET abnormal = 0, threshold = -1.0 WHERE id = 1")
        db.execute("INSERT INTO slice_scores (series_id, sop_instance_uid, sop_class_uid, "
                   "stack, slice_index, log_likelihood, kl, elbo, abnormal, confidence) "
                   "VALUES (1, '1.2.3.1.1', '1.2.840', 0, 0, -5.0, 1.0, -6.0, 0, 0.9)")
    upgrade(url)
    engine = make_engine(DatabaseSettings(url=url))
    try:
        with make_session_factory(engine)() as session:
            series = session.get(Series, 1)
            assert series is not None and series.reference_id is None
            assert refs.judged_note(session, series, 20) == (
                "Reference: out of the box (station learning is off)")
            assert refs.learning_rows(session, [1])[0].scores == (-5.0,)
            score = session.scalars(select(SliceScore)).one()
            assert (score.foreground, score.bundle_score) == (None, None)
    finally:
        engine.dispose()
    command.downgrade(alembic_config(url), "0012_alerts_problems")
    with sqlite3.connect(tmp_path / "old.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(slice_scores)")}
        assert db.execute("SELECT log_likelihood FROM slice_scores").fetchall() == [(-5.0,)]
    assert "station_references" not in tables and "bundle_score" not in columns
    upgrade(url)
    assert current_revision(url) == head_revision()


@pytest.mark.parametrize(("review", "abnormal", "role", "since"), [
    ("missed", False, refs.USED, True),          # a used series reported bad since
    ("confirm", True, refs.OUTLIER, True),       # an outlier's flag confirmed: excluded now
    ("false_alarm", True, refs.OUTLIER, True),   # an outlier called normal: used now
    ("confirm", False, refs.USED, False),        # a used series confirmed normal
    ("confirm", True, refs.EXCLUDED, False),     # the confirmed flag it was excluded for
    (None, False, refs.USED, False),
    ("missed", False, None, False),              # learning, or scored after calibration
])
def test_a_review_since_calibration_is_told_when_it_would_change_the_reference(
    review: str | None, abnormal: bool, role: str | None, since: bool,
) -> None:
    series = refs.LearnedSeries(1, "1.2.3", None, None, abnormal, review, role, False)
    assert series.review_since is since
