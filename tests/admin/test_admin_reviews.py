"""The review arithmetic: who acted, the series false-alarm target a slice target implies, and
the misses reviewers report."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from scipy.stats import binom
from sqlalchemy import update

from node.admin import reviews
from node.admin.auth import Identity
from node.admin.reviews import ModelStats, actor_name, binomial_tail, model_review_stats
from node.config import DatabaseSettings, LearningSettings, Settings
from node.errors import AdminActionError
from node.queue import references as refs
from node.queue.migrate import alembic_config, current_revision, head_revision, upgrade
from node.queue.models import Series, StationReference
from node.worker.station import BundleScale, settle_reference
from tests.helpers.db import insert_done_series, migrated_database
from tests.helpers.learning import KEY, add_learning_series, site_scores


@pytest.mark.parametrize(("n", "p", "k"), [(120, 0.01, 3), (36, 0.05, 1), (10, 0.2, 10),
                                           (5, 0.3, 0), (5, 0.3, 6)])
def test_binomial_tail_matches_scipy(n: int, p: float, k: int) -> None:
    assert binomial_tail(n, p, k) == pytest.approx(float(binom.sf(k - 1, n, p)), abs=1e-12)


def test_expected_series_rate_averages_over_the_scored_series() -> None:
    stats = ModelStats(model="m 1", scored=2, flagged=1, confirmed=0, false_alarms=1,
                       false_alarm_rate=0.5, series_shapes=((120, 3), (36, 1)))
    expected = (binom.sf(2, 120, 0.01) + binom.sf(0, 36, 0.01)) / 2
    assert stats.expected_false_alarm_rate(0.01) == pytest.approx(expected)
    assert ModelStats("m", 0, 0, 0, 0, None).expected_false_alarm_rate(0.01) is None
    # A series a calibrated station judged by its series edge counts with the station's own
    # expected share (1 of its 19 learning series flagged left out), not a binomial tail.
    mixed = ModelStats(model="m 1", scored=3, flagged=1, confirmed=0, false_alarms=1,
                       false_alarm_rate=1 / 3, series_shapes=((120, 3), (36, 1)),
                       station_shares=(1 / 19,))
    assert mixed.expected_false_alarm_rate(0.01) == pytest.approx((2 * expected + 1 / 19) / 3)
    assert ModelStats("m", 1, 0, 0, 0, 0.0, station_shares=(0.1,)).expected_false_alarm_rate(
        0.5) == pytest.approx(0.1)


def test_actor_is_the_authenticated_name_before_a_typed_one() -> None:
    assert actor_name(Identity("alice", "cookie"), "mallory", "10.0.0.1") == "alice"
    assert actor_name(Identity("", "bearer"), " bob ", "10.0.0.1") == "bob"
    assert actor_name(Identity("", "open"), "", "127.0.0.1") == "anonymous@127.0.0.1"


def test_a_series_judged_by_a_station_edge_counts_with_the_station_share(
    tmp_path: Path,
) -> None:
    """From the database: the learning series (judged by the rule's count) give binomial
    shapes, a series a calibrated station judged by its series edge gives that station's
    share of learning series flagged left out."""
    with migrated_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'q.db'}")) as factory:
        with factory() as session:
            reference_id = refs.ensure_reference(session, KEY).id
        for s in site_scores(5, seed=3):
            add_learning_series(factory, reference_id, s)
        scale = BundleScale(KEY.model_name, KEY.model_version, -36000.0, -25000.0, 0.01,
                            tuple(float(q) for q in range(201)))
        with factory.begin() as session:
            assert settle_reference(session, LearningSettings(series=5), reference_id, scale)
            session.execute(update(StationReference).where(StationReference.id == reference_id)
                            .values(series_flagged=1, series_used=4))
        judged = add_learning_series(factory, reference_id, site_scores(1, seed=4)[0],
                                     state=refs.CALIBRATED)
        with factory.begin() as session:
            session.execute(update(Series).where(Series.id == judged).values(
                series_score=-1.0, series_edge=-2.0))
        with factory() as session:
            [stats] = model_review_stats(session)
    assert stats.scored == 6 and stats.station_shares == (0.25,)
    assert len(stats.series_shapes) == 5
    n, k = stats.series_shapes[0]
    assert stats.expected_false_alarm_rate(0.01) == pytest.approx(
        (5 * binom.sf(k - 1, n, 0.01) + 0.25) / 6)


def test_a_reported_miss_is_counted_and_only_a_normal_verdict_can_be_one(
    tmp_path: Path,
) -> None:
    """A reviewer who sees an artifact in a series judged normal reports a miss: the Models
    page counts it and it leaves the false-alarm rate's denominator (it is not a negative);
    a flagged series cannot be one (it is a confirmed flag or a false alarm)."""
    with migrated_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'q.db'}")) as factory:
        with factory() as session:
            reference_id = refs.ensure_reference(session, KEY).id
        site = site_scores(4, seed=5)
        normal = [add_learning_series(factory, reference_id, s) for s in site[:3]]
        flagged = add_learning_series(factory, reference_id, site[3], abnormal=True)
        settings = Settings()
        with factory() as session:
            series = session.get(Series, normal[0])
            assert series is not None
            assert reviews.MISSED in reviews.allowed_actions(
                session, series, reviews.verdicts.series_verdict(session, series.id))
            reviews.perform(session, settings, series, reviews.MISSED, "dr ada", "motion")
            bad = session.get(Series, flagged)
            assert bad is not None
            with pytest.raises(AdminActionError, match="only a series judged normal"):
                reviews.perform(session, settings, bad, reviews.MISSED, "dr ada", None)
            reviews.perform(session, settings, bad, reviews.FALSE_ALARM, "dr ada", None)
            [stats] = model_review_stats(session)
            assert [a.label for a in reviews.actions_for(session, normal[0])] == [
                "missed artifact"]
    assert (stats.scored, stats.flagged, stats.missed, stats.false_alarms) == (4, 1, 1, 1)
    assert stats.false_alarm_rate == pytest.approx(1 / 3)


def test_migration_0021_admits_missed_reviews_and_the_downgrade_drops_them(
    tmp_path: Path,
) -> None:
    """Before revision 0021 the CHECK refuses a ``missed`` action; after it the row is kept
    with the earlier reviews (and the table's indexes); the downgrade deletes only the misses,
    and the upgrade works again."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0020_reference_learned_from")
    now = "2026-12-06 00:00:00.000000"
    insert = ("INSERT INTO admin_actions (series_id, actor, at, action) "
              "VALUES (1, 'dr', ?, ?)")
    with sqlite3.connect(tmp_path / "old.db") as db:
        insert_done_series(db, 1, "1.2.3", now)
        db.execute(insert, (now, "confirm"))
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(insert, (now, "missed"))
    upgrade(url)
    assert current_revision(url) == head_revision()

    def actions() -> list[str]:
        with sqlite3.connect(tmp_path / "old.db") as db:
            return [r[0] for r in db.execute("SELECT action FROM admin_actions ORDER BY id")]

    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute(insert, (now, "missed"))
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(insert, (now, "bogus"))
        indexes = {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'admin_actions'")}
    assert actions() == ["confirm", "missed"]
    assert {"ix_admin_actions_series_id", "ix_admin_actions_at"} <= indexes
    command.downgrade(alembic_config(url), "0020_reference_learned_from")
    assert actions() == ["confirm"]
    upgrade(url)
    assert actions() == ["confirm"]
