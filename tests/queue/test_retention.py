"""The retention job: images of series finished and quiet for ``retention_days`` are deleted,
the rest of what the node knows about them stays, and nothing younger or unfinished is
touched."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.errors import QueueConflict
from node.queue import repo, retention
from node.queue.models import Instance, Series, SeriesEvent, utcnow
from node.queue.states import SeriesState

Factory = sessionmaker[Session]
DAYS = 14.0


def _series(sf: Factory, storage: Path, uid: str, n: int, status: SeriesState,
            age_days: float, study: str = "1.2.9") -> list[Path]:
    """A series of ``n`` stored files, in ``status``, last touched ``age_days`` ago."""
    then = utcnow() - timedelta(days=age_days)
    files = []
    for i in range(n):
        rel = Path(study) / uid / f"{uid}.{i}.dcm"
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        (storage / rel).write_bytes(b"DICM" * 10)
        files.append(storage / rel)
        with sf.begin() as s:
            repo.record_instance(s, repo.InstanceRecord(
                study_instance_uid=study, series_instance_uid=uid, sop_instance_uid=f"{uid}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2",
                path=str(rel), size_bytes=40, instance_number=i, modality="MR",
                series_description=None, body_part=None, calling_aet=None, peer_address=None,
                received_at=then))
    with sf.begin() as s:
        s.execute(update(Series).where(Series.series_instance_uid == uid)
                  .values(status=status, updated_at=then))
    return files


def _row(sf: Factory, uid: str) -> Series:
    with sf() as s:
        return s.execute(select(Series).where(Series.series_instance_uid == uid)).scalar_one()


def test_only_finished_and_quiet_series_lose_their_images(session_factory: Factory,
                                                         tmp_path: Path) -> None:
    sf, storage = session_factory, tmp_path / "storage"
    old_done = _series(sf, storage, "1.9.1", 3, SeriesState.DONE, age_days=20)
    old_failed = _series(sf, storage, "1.9.2", 2, SeriesState.FAILED, age_days=15)
    young = _series(sf, storage, "1.9.3", 2, SeriesState.DONE, age_days=3)
    old_queued = _series(sf, storage, "1.9.4", 2, SeriesState.QUEUED, age_days=30)
    other_study = _series(sf, storage, "1.9.5", 1, SeriesState.SKIPPED, age_days=20,
                          study="1.2.8")

    with sf() as s:
        received = repo.received_instances(s)
    assert received == 10
    assert retention.purge_expired(sf, storage, DAYS) == 3
    with sf() as s:  # a count of received instances never goes down
        assert repo.received_instances(s) == received
    for f in old_done + old_failed + other_study:
        assert not f.exists()
    for f in young + old_queued:
        assert f.exists()
    assert not (storage / "1.2.9" / "1.9.1").exists()  # emptied series folder removed ...
    assert (storage / "1.2.9").is_dir()  # ... the study folder keeps its other series
    assert not (storage / "1.2.8").exists()  # a study folder left empty goes too
    assert storage.is_dir()

    purged = _row(sf, "1.9.1")
    assert purged.status is SeriesState.DONE and purged.instance_count == 0
    assert purged.purged_at is not None and purged.purged_instances == 3
    with sf() as s:
        left = set(s.scalars(select(Instance.sop_instance_uid)))
        event = s.execute(select(SeriesEvent).where(SeriesEvent.series_id == purged.id)
                          .order_by(SeriesEvent.id.desc())).scalars().first()
    assert left == {"1.9.3.0", "1.9.3.1", "1.9.4.0", "1.9.4.1"}
    assert event is not None and event.actor == "scheduler" and "retention" in (event.reason or "")
    assert _row(sf, "1.9.3").purged_at is None
    # A row pointing outside the storage folder (never written by ingest) deletes nothing.
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"keep")
    _series(sf, storage, "1.9.8", 1, SeriesState.DONE, age_days=20)
    with sf.begin() as s:
        s.execute(update(Instance).where(Instance.sop_instance_uid == "1.9.8.0")
                  .values(path=str(outside)))
    assert retention.purge_expired(sf, storage, DAYS) == 1
    assert outside.exists()
    # A second run has nothing left to do; 0 days means keep everything.
    assert retention.purge_expired(sf, storage, DAYS) == 0
    assert retention.purge_expired(sf, storage, 0.0, now=utcnow() + timedelta(days=999)) == 0


def test_a_purged_series_cannot_be_rescored_but_a_late_instance_reopens_it(
        session_factory: Factory, tmp_path: Path) -> None:
    sf, storage = session_factory, tmp_path / "storage"
    _series(sf, storage, "1.9.6", 2, SeriesState.DONE, age_days=20)
    assert retention.purge_expired(sf, storage, DAYS) == 1
    sid = _row(sf, "1.9.6").id
    with sf.begin() as s, pytest.raises(QueueConflict, match="retention policy"):
        repo.requeue(s, sid, reason="test", actor="test")
    _series(sf, storage, "1.9.6", 1, SeriesState.DONE, age_days=0)  # a late instance
    row = _row(sf, "1.9.6")
    assert row.instance_count == 1
    with sf.begin() as s:
        assert repo.requeue(s, sid, reason="test", actor="test").status is SeriesState.QUEUED


def test_a_series_reopened_meanwhile_is_not_purged(session_factory: Factory,
                                                   tmp_path: Path) -> None:
    """Between the scan and the purge an instance arrives: the series is receiving again,
    and keeps its rows and files."""
    sf, storage = session_factory, tmp_path / "storage"
    files = _series(sf, storage, "1.9.7", 2, SeriesState.DONE, age_days=20)
    cutoff = utcnow() - timedelta(days=DAYS)
    with sf() as s:
        [sid] = repo.expired_series_ids(s, cutoff, 10)
    with sf.begin() as s:
        s.execute(update(Series).where(Series.id == sid)
                  .values(status=SeriesState.RECEIVING, last_received_at=utcnow()))
    with sf.begin() as s, pytest.raises(QueueConflict):
        repo.purge_images(s, sid, cutoff, "test")
    assert all(f.exists() for f in files)
    assert _row(sf, "1.9.7").instance_count == 2


def test_files_a_crashed_purge_left_are_removed_by_the_next_run(
        session_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crash between the purge's commit and its unlinks leaves files no row points to; the
    next run removes them, but never a late instance's file (it has a row) nor a file being
    stored right now (younger than an hour, its row not committed yet)."""
    sf, storage = session_factory, tmp_path / "storage"
    files = _series(sf, storage, "1.9.8", 3, SeriesState.DONE, age_days=20)
    _series(sf, storage, "1.9.9", 1, SeriesState.DONE, age_days=20)  # purged normally
    sid = _row(sf, "1.9.8").id
    with sf.begin() as s:  # the purge's transaction commits ... and the node dies
        assert len(repo.purge_images(s, sid, utcnow() - timedelta(days=DAYS), "test")) == 3
    old = time.time() - 2 * retention.LEFTOVER_MIN_AGE_S
    for f in files:
        os.utime(f, (old, old))
    late = files[0].with_name("1.9.8.late.dcm")  # a late instance reopened it: it has a row
    late.write_bytes(b"DICM")
    os.utime(late, (old, old))
    with sf.begin() as s:
        repo.record_instance(s, repo.InstanceRecord(
            study_instance_uid="1.2.9", series_instance_uid="1.9.8", sop_instance_uid="1.9.8.9",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2",
            path=str(late.relative_to(storage)), size_bytes=4, instance_number=9, modality="MR",
            series_description=None, body_part=None, calling_aet=None, peer_address=None,
            received_at=utcnow()))
    arriving = files[0].with_name("1.9.8.arriving.dcm")  # renamed into place, row pending
    arriving.write_bytes(b"DICM")

    caplog.set_level(logging.WARNING, logger="node.queue.retention")
    assert retention.purge_expired(sf, storage, DAYS) == 1  # 1.9.9; then the leftovers
    assert not any(f.exists() for f in files)
    assert late.exists() and arriving.exists()
    assert [r.files_removed for r in caplog.records  # type: ignore[attr-defined]
            if r.message == "removed files an earlier purge left behind"] == [3]
    assert retention.remove_leftovers(sf, storage) == 0  # nothing more to do

    # Outside the look-back window the folder is no longer checked.
    later = utcnow() + timedelta(days=retention.LEFTOVER_WINDOW_DAYS + 1)
    os.utime(arriving, (old, old))
    assert retention.remove_leftovers(sf, storage, later) == 0 and arriving.exists()
    assert retention.remove_leftovers(sf, storage) == 1 and not arriving.exists()


@pytest.mark.parametrize("days", [14.0, 0.0])
def test_install_adds_the_job_unless_retention_is_off(session_factory: Factory,
                                                      days: float) -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    settings = Settings.model_validate({"storage": {"retention_days": days,
                                                    "retention_check_s": 600}})
    retention.install(scheduler, settings, session_factory)
    job = scheduler.get_job(retention.JOB_ID)
    if days:
        assert job is not None and job.trigger.interval.total_seconds() == 600
        assert job.args[2] == days
    else:
        assert job is None
