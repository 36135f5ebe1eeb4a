"""The complete-series job: receiving series become queued after the idle time, or once their
sender released its association and they settled, not before."""

from __future__ import annotations

from datetime import timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.queue import jobs, repo
from node.queue.models import Series, SeriesEvent, utcnow
from node.queue.states import SeriesState


def _add(sf: sessionmaker[Session], uid: str, age_s: float) -> None:
    with sf.begin() as s:
        repo.record_instance(s, repo.InstanceRecord(
            study_instance_uid="1.2", series_instance_uid=uid, sop_instance_uid=uid + ".1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2",
            path="x", size_bytes=1, instance_number=None, modality="MR",
            series_description=None, body_part=None, calling_aet=None, peer_address=None,
            received_at=utcnow() - timedelta(seconds=age_s)))


def test_only_idle_series_are_queued(session_factory: sessionmaker[Session]) -> None:
    _add(session_factory, "1.2.1", age_s=40)
    _add(session_factory, "1.2.2", age_s=5)
    assert jobs.queue_idle_series(session_factory, idle_s=30) == 1
    with session_factory() as s:
        states = dict(s.execute(select(Series.series_instance_uid, Series.status)).all())
    assert states == {"1.2.1": SeriesState.QUEUED, "1.2.2": SeriesState.RECEIVING}
    assert jobs.queue_idle_series(session_factory, idle_s=30) == 0


def _release(sf: sessionmaker[Session], uid: str, count: int, age_s: float) -> None:
    with sf.begin() as s:
        repo.record_release(s, {uid: count}, at=utcnow() - timedelta(seconds=age_s))


def _states(sf: sessionmaker[Session]) -> dict[str, SeriesState]:
    with sf() as s:
        return dict(s.execute(select(Series.series_instance_uid, Series.status)).all())


def test_released_and_settled_series_are_queued(session_factory: sessionmaker[Session]) -> None:
    sf = session_factory
    for uid, age in (("1.3.1", 5), ("1.3.2", 5), ("1.3.3", 5), ("1.3.4", 5), ("1.3.5", 0.5)):
        _add(sf, uid, age_s=age)
    _release(sf, "1.3.1", 12, age_s=4.9)  # released after its last instance, settled
    _release(sf, "1.3.2", 1, age_s=4.9)  # one instance per association: no
    _release(sf, "1.3.3", 12, age_s=6)  # an instance arrived after the release: no
    # 1.3.4: never released (aborted, or still open): no
    _release(sf, "1.3.5", 12, age_s=0.4)  # released, but not settled yet
    # Without the rule (complete_on_release off) nothing moves before the idle time ...
    assert jobs.queue_idle_series(sf, idle_s=30) == 0
    # ... with it, only the released, settled, multi-instance series.
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 1
    assert _states(sf) == {"1.3.1": SeriesState.QUEUED, "1.3.2": SeriesState.RECEIVING,
                           "1.3.3": SeriesState.RECEIVING, "1.3.4": SeriesState.RECEIVING,
                           "1.3.5": SeriesState.RECEIVING}
    with sf() as s:
        reasons = s.execute(select(SeriesEvent.reason).where(SeriesEvent.to_status == "queued")
                            ).scalars().all()
    assert reasons == ["association released by the sender"]
    # A lower bar takes the single-instance one; the idle time still takes everything.
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0,
                                  release_min_instances=1) == 1
    assert jobs.queue_idle_series(sf, idle_s=0.1, release_settle_s=2.0) == 3
    assert set(_states(sf).values()) == {SeriesState.QUEUED}


def test_a_reopened_series_waits_for_its_next_release(
        session_factory: sessionmaker[Session]) -> None:
    sf = session_factory
    _add(sf, "1.4.1", age_s=10)
    _release(sf, "1.4.1", 5, age_s=9)
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 1
    with sf.begin() as s:  # scored, then more of the series arrives
        s.execute(update(Series).values(status=SeriesState.DONE))
    _add(sf, "1.4.1.x", age_s=5)  # another instance of another series: untouched
    with sf.begin() as s:
        repo.record_instance(s, repo.InstanceRecord(
            study_instance_uid="1.2", series_instance_uid="1.4.1", sop_instance_uid="1.4.1.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2",
            path="y", size_bytes=1, instance_number=None, modality="MR",
            series_description=None, body_part=None, calling_aet=None, peer_address=None,
            received_at=utcnow() - timedelta(seconds=5)))
    assert _states(sf)["1.4.1"] is SeriesState.RECEIVING
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 0
    _release(sf, "1.4.1", 1, age_s=4)
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 0  # 1 < 2
    _release(sf, "1.4.1", 3, age_s=4)
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 1


def test_a_released_series_short_of_its_declared_count_waits(
        session_factory: sessionmaker[Session]) -> None:
    """A sender pausing between associations: the first part's release does not end a series
    whose instances declared more images (Images in Acquisition); the idle time still does."""
    sf = session_factory
    for uid in ("1.5.1", "1.5.2", "1.5.3"):
        _add(sf, uid, age_s=5)
    with sf.begin() as s:
        repo.record_release(s, {"1.5.1": 12, "1.5.2": 12, "1.5.3": 12},
                            at=utcnow() - timedelta(seconds=4.9),
                            declared={"1.5.1": 24, "1.5.2": 1})  # 1.5.3 declared nothing
    with sf() as s:
        expected = dict(s.execute(select(Series.series_instance_uid,
                                         Series.expected_instances)).all())
    assert expected == {"1.5.1": 24, "1.5.2": 1, "1.5.3": None}
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 2
    assert _states(sf)["1.5.1"] is SeriesState.RECEIVING  # 1 instance of 24 here
    # The rest arrives in a second association, which declares a smaller count: the largest
    # declared stays; once the series holds it, its release ends it.
    with sf.begin() as s:
        s.execute(update(Series).where(Series.series_instance_uid == "1.5.1")
                  .values(instance_count=23))
    with sf.begin() as s:
        repo.record_release(s, {"1.5.1": 12}, at=utcnow() - timedelta(seconds=4.9),
                            declared={"1.5.1": 20})
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 0  # 23 < 24
    with sf.begin() as s:
        s.execute(update(Series).where(Series.series_instance_uid == "1.5.1")
                  .values(instance_count=24))
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 1
    with sf() as s:
        assert s.scalar(select(Series.expected_instances)
                        .where(Series.series_instance_uid == "1.5.1")) == 24
    # Never complete by count: the idle time takes it anyway.
    _add(sf, "1.5.4", age_s=40)
    with sf.begin() as s:
        repo.record_release(s, {"1.5.4": 5}, at=utcnow() - timedelta(seconds=39),
                            declared={"1.5.4": 99})
    assert jobs.queue_idle_series(sf, idle_s=30, release_settle_s=2.0) == 1


@pytest.mark.parametrize("on", [True, False])
def test_install_adds_one_interval_job(session_factory: sessionmaker[Session], on: bool) -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    settings = Settings.model_validate({"queue": {
        "check_interval_s": 0.5, "complete_on_release": on, "release_settle_s": 1.5,
        "release_min_instances": 3}})
    jobs.install(scheduler, settings, session_factory)
    job = scheduler.get_job(jobs.JOB_ID)
    assert job is not None and job.trigger.interval.total_seconds() == 0.5
    assert job.kwargs == {"release_settle_s": 1.5 if on else None, "release_min_instances": 3}
