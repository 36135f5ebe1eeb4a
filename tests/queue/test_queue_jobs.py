"""The idle-series job: receiving series become queued after the idle time, not before."""

from __future__ import annotations

from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.queue import jobs, repo
from node.queue.models import Series, utcnow
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


def test_install_adds_one_interval_job(session_factory: sessionmaker[Session]) -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    settings = Settings.model_validate({"queue": {"check_interval_s": 0.5}})
    jobs.install(scheduler, settings, session_factory)
    job = scheduler.get_job(jobs.JOB_ID)
    assert job is not None and job.trigger.interval.total_seconds() == 0.5
