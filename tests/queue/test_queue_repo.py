"""Queue transitions on a real (temp, migrated) SQLite database."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings
from node.errors import QueueConflict
from node.queue import repo
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import alembic_config, current_revision, head_revision, upgrade
from node.queue.models import Instance, Series, SeriesEvent, utcnow
from node.queue.states import SeriesState
from tests.helpers.claims import drain_queue
from tests.helpers.db import insert_done_series
from tests.helpers.records import count_driver_path, driver_path_off, record_scenario

Factory = sessionmaker[Session]


def _record(sf: Factory, series_uid: str, sop_uid: str, **kw: object) -> repo.RecordResult:
    rec = repo.InstanceRecord(
        study_instance_uid="1.2.3",
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=kw.pop("path", f"1.2.3/{series_uid}/{sop_uid}.dcm"),  # type: ignore[arg-type]
        size_bytes=100,
        instance_number=1,
        modality="CT",
        series_description="desc",
        body_part="HEAD",
        calling_aet="SCU",
        peer_address="127.0.0.1:1",
        received_at=kw.pop("received_at", utcnow()),  # type: ignore[arg-type]
    )
    with sf.begin() as s:
        return repo.record_instance(s, rec)


def _series(sf: Factory, uid: str) -> Series:
    with sf() as s:
        return s.execute(select(Series).where(Series.series_instance_uid == uid)).scalar_one()


def _events(sf: Factory, series_id: int) -> list[tuple[str | None, str]]:
    with sf() as s:
        rows = s.execute(
            select(SeriesEvent.from_status, SeriesEvent.to_status)
            .where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id)
        ).all()
    return [(r[0], r[1]) for r in rows]


def _queue(sf: Factory, uid: str, n: int = 1) -> Series:
    for i in range(n):
        _record(sf, uid, f"{uid}.{i}", received_at=utcnow() - timedelta(seconds=60))
    series = _series(sf, uid)
    with sf.begin() as s:
        return repo.mark_queued(s, series.id, idle_before=utcnow())


def test_migration_is_at_head(db_url: str, session_factory: Factory) -> None:
    assert current_revision(db_url) == head_revision()


def test_sqlite_runs_in_wal_with_busy_timeout(session_factory: Factory) -> None:
    with session_factory() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA busy_timeout")).scalar() == 10000
        assert s.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_record_instance_counts_and_duplicates(session_factory: Factory) -> None:
    first = _record(session_factory, "1.2.3.4", "1.2.3.4.1")
    assert first.new_instance
    _record(session_factory, "1.2.3.4", "1.2.3.4.2")
    again = _record(session_factory, "1.2.3.4", "1.2.3.4.1")
    assert not again.new_instance and again.stale_path is None
    series = _series(session_factory, "1.2.3.4")
    assert series.instance_count == 2
    assert series.status is SeriesState.RECEIVING
    assert series.first_received_at.tzinfo is UTC
    with session_factory() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar() == 2
    assert _events(session_factory, series.id) == [(None, "receiving")]


def test_instance_moving_series_fixes_both_counts(session_factory: Factory) -> None:
    _record(session_factory, "1.2.3.4", "1.2.3.4.1", path="a/b/1.dcm")
    moved = _record(session_factory, "1.2.3.5", "1.2.3.4.1", path="a/c/1.dcm")
    assert moved.stale_path == "a/b/1.dcm"
    assert _series(session_factory, "1.2.3.4").instance_count == 0
    assert _series(session_factory, "1.2.3.5").instance_count == 1


def test_mark_queued_only_when_still_idle(session_factory: Factory) -> None:
    _record(session_factory, "1.2.3.4", "1.2.3.4.1")
    series = _series(session_factory, "1.2.3.4")
    with pytest.raises(QueueConflict), session_factory.begin() as s:
        repo.mark_queued(s, series.id, idle_before=utcnow() - timedelta(seconds=30))
    with session_factory.begin() as s:
        queued = repo.mark_queued(s, series.id, idle_before=utcnow())
    assert queued.status is SeriesState.QUEUED
    assert _events(session_factory, series.id)[-1] == ("receiving", "queued")


def test_claim_done_and_reopen_by_new_instance(session_factory: Factory) -> None:
    series = _queue(session_factory, "1.2.3.4")
    with session_factory.begin() as s:
        claimed = repo.claim_next_queued(s, "w1", lease_s=60)
    assert claimed is not None and claimed.id == series.id
    assert claimed.status is SeriesState.PROCESSING
    assert claimed.worker_id == "w1" and claimed.attempts == 1
    assert claimed.lease_until is not None and claimed.lease_until > utcnow()
    with session_factory.begin() as s:
        assert repo.claim_next_queued(s, "w2", lease_s=60) is None
    with pytest.raises(QueueConflict), session_factory.begin() as s:
        repo.mark_done(s, series.id, worker_id="w2")
    with session_factory.begin() as s:
        done = repo.mark_done(s, series.id, "scored", worker_id="w1")
    assert done.status is SeriesState.DONE and done.lease_until is None
    _record(session_factory, "1.2.3.4", "1.2.3.4.99")
    reopened = _series(session_factory, "1.2.3.4")
    assert reopened.status is SeriesState.RECEIVING
    assert [e[1] for e in _events(session_factory, series.id)] == [
        "receiving", "queued", "processing", "done", "receiving"]


def test_new_instance_during_processing_invalidates_the_worker(session_factory: Factory) -> None:
    series = _queue(session_factory, "1.2.3.4")
    with session_factory.begin() as s:
        repo.claim_next_queued(s, "w1", lease_s=60)
    _record(session_factory, "1.2.3.4", "1.2.3.4.50")
    with pytest.raises(QueueConflict), session_factory.begin() as s:
        repo.mark_done(s, series.id, worker_id="w1")
    assert _series(session_factory, "1.2.3.4").status is SeriesState.RECEIVING


def test_skipped_failed_and_requeue(session_factory: Factory) -> None:
    a, b = _queue(session_factory, "1.2.3.4"), _queue(session_factory, "1.2.3.5")
    with session_factory.begin() as s:
        repo.claim_next_queued(s, "w", lease_s=60)
        repo.claim_next_queued(s, "w", lease_s=60)
    with session_factory.begin() as s:
        repo.mark_skipped(s, a.id, "no rule matches")
        repo.mark_failed(s, b.id, "cannot assemble")
    assert _series(session_factory, "1.2.3.4").status_reason == "no rule matches"
    assert _series(session_factory, "1.2.3.5").status is SeriesState.FAILED
    with session_factory.begin() as s:
        again = repo.requeue(s, b.id, reason="retry", actor="admin")
    assert again.status is SeriesState.QUEUED and again.attempts == 0


def test_transition_rolls_back_with_the_callers_writes(session_factory: Factory) -> None:
    series = _queue(session_factory, "1.2.3.4")
    with pytest.raises(QueueConflict), session_factory.begin() as s:
        s.execute(text("UPDATE series SET series_description = 'changed'"))
        repo.mark_done(s, series.id)  # not processing: refused, the UPDATE above rolls back
    assert _series(session_factory, "1.2.3.4").series_description == "desc"


def test_expired_leases_requeue_then_abandon(session_factory: Factory) -> None:
    series = _queue(session_factory, "1.2.3.4")
    for attempt in (1, 2):
        with session_factory.begin() as s:
            claimed = repo.claim_next_queued(s, "w", lease_s=0.001)
        assert claimed is not None and claimed.attempts == attempt
        later = utcnow() + timedelta(seconds=1)
        with session_factory.begin() as s:
            changed = repo.requeue_expired_leases(s, max_attempts=2, now=later)
        assert [c.id for c in changed] == [series.id]
    final = _series(session_factory, "1.2.3.4")
    assert final.status is SeriesState.FAILED and final.status_reason == "abandoned"


def test_requeue_processing_at_startup(session_factory: Factory) -> None:
    a, b = _queue(session_factory, "1.2.3.4"), _queue(session_factory, "1.2.3.5")
    with session_factory.begin() as s:
        repo.mark_processing(s, a.id, "node-a", 600)
        repo.mark_processing(s, b.id, "node-b", 600)
    with session_factory.begin() as s:
        changed = repo.requeue_processing_at_startup(s, worker_id="node-a")
    assert [c.id for c in changed] == [a.id]
    assert _series(session_factory, "1.2.3.4").status is SeriesState.QUEUED
    assert _series(session_factory, "1.2.3.5").status is SeriesState.PROCESSING


def test_concurrent_claims_never_share_a_series(session_factory: Factory) -> None:
    for i in range(20):
        _queue(session_factory, f"1.2.3.{100 + i}")
    claims = [series_id for _, series_id in drain_queue(session_factory)]
    assert len(claims) == 20 and len(set(claims)) == 20


def test_naive_datetimes_are_refused(session_factory: Factory) -> None:
    with pytest.raises(Exception, match="naive"):
        _record(session_factory, "1.2.3.4", "1.2.3.4.1",
                received_at=datetime(2020, 1, 1))


def test_associations_are_recorded(session_factory: Factory) -> None:
    with session_factory.begin() as s:
        assoc_id = repo.open_association(s, calling_aet="SCU", called_aet="VAENODE",
                                         peer_address="127.0.0.1:5")
    with session_factory.begin() as s:
        repo.close_association(s, assoc_id, result="released", instances=3, failed=1)
        repo.record_rejected_association(s, calling_aet="BAD", called_aet="VAENODE",
                                         peer_address="127.0.0.1:6", reason="not allowed")
    with session_factory() as s:
        rows = s.execute(text("SELECT result, instance_count, failed_count FROM associations "
                              "ORDER BY id")).all()
    assert rows == [("released", 3, 1), ("rejected: not allowed", 0, 0)]


def test_migration_0005_withdraws_pending_deliveries_of_superseded_reports(
        tmp_path: Path) -> None:
    """Upgrading a database that has them: pending rows of superseded reports become
    ``superseded``, the others keep their state; the downgrade and a second upgrade work."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0004_admin")
    now = "2026-11-26 00:00:00.000000"
    with sqlite3.connect(tmp_path / "old.db") as db:
        insert_done_series(db, 1, "1.2.3", now)
        for rid, superseded in ((1, 1), (2, 0)):
            db.execute("INSERT INTO reports (id, series_id, kind, sop_instance_uid, "
                       "sop_class_uid, series_instance_uid, instance_number, path, created_at, "
                       "superseded) VALUES (?, 1, 'SR', ?, '1.2.840.10008.5.1.4.1.1.88.33', "
                       "'1.2.9', ?, 'x.dcm', ?, ?)", (rid, f"1.2.9.{rid}", rid, now, superseded))
        for oid, rid, state in ((1, 1, "pending"), (2, 1, "sent"), (3, 2, "pending")):
            db.execute("INSERT INTO outbox (id, report_id, destination, ae_title, host, port, "
                       "state, attempts, next_attempt_at, created_at) VALUES "
                       "(?, ?, 'pacs', 'PACS', '127.0.0.1', 104, ?, 0, ?, ?)",
                       (oid, rid, state, now, now))
    upgrade(url)
    assert current_revision(url) == head_revision()

    def states() -> list[str]:
        with sqlite3.connect(tmp_path / "old.db") as db:
            return [r[0] for r in db.execute("SELECT state FROM outbox ORDER BY id")]

    assert states() == ["superseded", "sent", "pending"]
    with sqlite3.connect(tmp_path / "old.db") as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE outbox SET state = 'bogus' WHERE id = 1")
    command.downgrade(alembic_config(url), "0004_admin")
    assert states() == ["failed", "sent", "pending"]
    upgrade(url)
    assert states() == ["failed", "sent", "pending"]


def _fresh_factory(tmp_path: Path, name: str) -> Factory:
    url = f"sqlite:///{tmp_path / name}"
    upgrade(url)
    return make_session_factory(make_engine(DatabaseSettings(url=url)))


def test_record_instance_driver_sql_writes_what_sqlalchemy_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used = count_driver_path(monkeypatch)
    fast_results, fast_rows = record_scenario(_fresh_factory(tmp_path, "fast.db"))
    assert used[0] == 4  # the instances of a receiving series they are new to or part of
    with monkeypatch.context() as m:
        driver_path_off(m)
        slow_results, slow_rows = record_scenario(_fresh_factory(tmp_path, "slow.db"))
    assert used[0] == 4
    assert fast_results == slow_results
    assert fast_rows == slow_rows
    assert fast_rows["instances"][1][-1] == "2026-01-02 03:04:09.678929"  # step 4, as before


def test_record_instance_driver_sql_errors_are_sqlalchemy_errors(
        session_factory: Factory) -> None:
    _record(session_factory, "1.2.3.4", "1.2.3.4.1")
    with session_factory.begin() as s:
        s.execute(text("CREATE TRIGGER no_more BEFORE INSERT ON instances "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    with pytest.raises(IntegrityError):
        _record(session_factory, "1.2.3.4", "1.2.3.4.2")


def _durations(sf: Factory, series_id: int) -> list[tuple[str, float | None]]:
    with sf() as s:
        return [(e.to_status, e.duration_s) for e in s.scalars(
            select(SeriesEvent).where(SeriesEvent.series_id == series_id)
            .order_by(SeriesEvent.id))]


def test_done_event_carries_the_seconds_of_its_run(session_factory: Factory) -> None:
    series = _queue(session_factory, "1.2.3.4")
    with session_factory.begin() as s:
        repo.claim_next_queued(s, "w1", lease_s=60)
        # The run began 7 s ago (as a slow model would take).
        s.execute(text("UPDATE series_events SET at = :at WHERE to_status = 'processing'"),
                  {"at": (utcnow() - timedelta(seconds=7)).replace(tzinfo=None)})
    with session_factory.begin() as s:
        repo.mark_failed(s, series.id, "model broke", worker_id="w1")
    with session_factory.begin() as s:
        repo.requeue(s, series.id, reason="retry", actor="admin")
    with session_factory.begin() as s:
        repo.claim_next_queued(s, "w1", lease_s=60)
    with session_factory.begin() as s:
        repo.mark_done(s, series.id, "scored", worker_id="w1")
    events = _durations(session_factory, series.id)
    done = [d for status, d in events if status == "done"]
    # Only the second run ended done: its seconds are from its own start, not the failed one's.
    assert len(done) == 1 and done[0] is not None and 0.0 <= done[0] < 5.0
    assert all(d is None for status, d in events if status != "done")


def test_migration_0010_fills_in_the_durations_of_past_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0009_alerts")
    t0 = datetime(2026, 11, 26, 8, 0, 0)
    with sqlite3.connect(tmp_path / "old.db") as db:
        for sid in (1, 2):
            insert_done_series(db, sid, f"1.2.{sid}", str(t0))
        # Series 1: a run that failed, then one of 12.5 s; series 2: a run of 3 s, then a
        # re-score of 4 s.
        events = [(1, "processing", 0), (1, "failed", 30), (1, "processing", 100),
                  (2, "processing", 0), (1, "done", 112.5), (2, "done", 3),
                  (2, "processing", 50), (2, "done", 54)]
        for sid, status, seconds in events:
            db.execute("INSERT INTO series_events (series_id, at, to_status, actor) "
                       "VALUES (?, ?, ?, 'worker')",
                       (sid, str(t0 + timedelta(seconds=seconds)), status))
    upgrade(url)
    with sqlite3.connect(tmp_path / "old.db") as db:
        rows = db.execute("SELECT series_id, to_status, duration_s FROM series_events "
                          "ORDER BY id").fetchall()
    assert [(sid, d) for sid, status, d in rows if status == "done"] == [
        (1, 12.5), (2, 3.0), (2, 4.0)]
    assert all(d is None for _, status, d in rows if status != "done")
    command.downgrade(alembic_config(url), "0009_alerts")
    upgrade(url)
    assert current_revision(url) == head_revision()
