"""The worker on a real migrated database: score and report, skip, fail one series and go on,
never double-claim, recover from a dead worker, score again after new instances."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.queue import repo, retention
from node.queue.db import make_engine, make_session_factory
from node.queue.models import Report, Series, SeriesEvent, SliceScore, utcnow
from node.queue.states import SeriesState
from node.worker.jobs import Worker
from node.worker.score import BundleCache, Outcome, process_series
from tests.helpers.series import IXI, WrittenSeries, load_volume, write_series
from tests.worker.conftest import (
    SIEMENS_PHASE,
    queue_series,
    series_files,
    sr_in_series,
    store_and_queue,
    store_files,
)

SUBJECT = IXI / "IXI015-HH-1258_T1.nii.gz"


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    if not SUBJECT.is_file():
        pytest.skip(f"IXI volume not found: {SUBJECT}")
    return load_volume(SUBJECT)


@pytest.fixture
def make_series(
    tmp_path: Path, volume: tuple[np.ndarray, tuple[float, float, float]]
) -> Callable[..., WrittenSeries]:
    """Write a short axial MR series (slices 40..64 of one IXI head) under a new folder."""
    counter = iter(range(1000))

    def build(z: tuple[int, int] = (40, 64), **kw: object) -> WrittenSeries:
        data, spacing = volume
        out = tmp_path / "series" / f"s{next(counter)}"
        return write_series(data[:, :, z[0] : z[1]], spacing, out, **kw)  # type: ignore[arg-type]

    return build


def status_of(session_factory: sessionmaker[Session], series_id: int) -> Series:
    with session_factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        return series


def count(session_factory: sessionmaker[Session], stmt: object) -> int:
    with session_factory() as session:
        return int(session.execute(stmt).scalar_one())  # type: ignore[call-overload]


def test_scores_and_reports_a_queued_series(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    written = make_series()
    series_id = store_and_queue(session_factory, worker_settings, written.paths[::-1])
    worker = Worker(worker_settings, session_factory, worker_id="w1")
    assert worker.run_until_idle() == [Outcome.DONE]

    series = status_of(session_factory, series_id)
    assert series.status is SeriesState.DONE
    assert series.scored_slices == 24 and series.model_name == "tiny-test"
    assert series.routing_rule == "brain-t1-mr" and series.min_abnormal_slices == 3
    assert series.abnormal == (series.abnormal_slices >= 3)
    assert series.threshold is not None and series.scored_at is not None
    with session_factory() as session:
        rows = session.execute(
            select(SliceScore).where(SliceScore.series_id == series_id)
            .order_by(SliceScore.slice_index)
        ).scalars().all()
        reports = session.execute(select(Report).where(Report.series_id == series_id)
                                  ).scalars().all()
    # One row per slice, in slice order along the normal (files were stored in reverse).
    assert [r.sop_instance_uid for r in rows] == written.sop_instance_uids
    assert [r.slice_index for r in rows] == list(range(24))
    assert all(r.frame is None and 0.0 <= r.confidence <= 1.0 for r in rows)
    assert all(np.isfinite([r.log_likelihood, r.kl, r.elbo]).all() for r in rows)
    assert sum(r.abnormal for r in rows) == series.abnormal_slices
    assert all(r.station_score is None for r in rows)  # the bundle declares no station score
    kinds = sorted(r.kind for r in reports)
    assert kinds == (["KOS", "SR"] if series.abnormal_slices else ["SR"])
    sr = next(r for r in reports if r.kind == "SR")
    doc = pydicom.dcmread(worker_settings.storage.dir / sr.path)
    assert doc.StudyInstanceUID == written.study_instance_uid
    assert doc.SeriesInstanceUID != written.series_instance_uid


def test_phase_series_skipped_with_reason(
    worker_settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    series_id = store_and_queue(session_factory, worker_settings, series_files(SIEMENS_PHASE))
    assert Worker(worker_settings, session_factory).run_until_idle() == [Outcome.SKIPPED]
    series = status_of(session_factory, series_id)
    assert series.status is SeriesState.SKIPPED
    assert series.status_reason is not None and "phase image" in series.status_reason
    assert series.scored_slices is None
    assert count(session_factory, select(func.count()).select_from(Report)) == 0


def test_one_broken_series_fails_and_the_worker_goes_on(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    broken = make_series(z=(40, 48))
    good = make_series(z=(50, 60))
    broken_id = store_and_queue(session_factory, worker_settings, broken.paths)
    good_id = store_and_queue(session_factory, worker_settings, good.paths)
    # Damage one stored file of the first series (a disk error, a truncated copy).
    stored = next((worker_settings.storage.dir / broken.study_instance_uid).rglob("*.dcm"))
    stored.write_bytes(b"\0" * 50)
    outcomes = Worker(worker_settings, session_factory).run_until_idle()
    assert outcomes == [Outcome.FAILED, Outcome.DONE]
    failed = status_of(session_factory, broken_id)
    assert failed.status is SeriesState.FAILED
    assert failed.status_reason is not None and "not readable DICOM" in failed.status_reason
    assert status_of(session_factory, good_id).status is SeriesState.DONE


def test_missing_model_fails_only_the_series_routed_to_it(
    tmp_path: Path, worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    settings = worker_settings.model_copy(
        update={"routing": worker_settings.routing.model_validate({"rules": [
            {"name": "ct", "modality": "CT", "model": str(tmp_path / "no-such-bundle")},
            {"name": "mr", "modality": "MR"},
        ]})}
    )
    ct = make_series(z=(40, 48), modality="CT")
    mr = make_series(z=(50, 58))
    ct_id = store_and_queue(session_factory, settings, ct.paths)
    mr_id = store_and_queue(session_factory, settings, mr.paths)
    assert Worker(settings, session_factory).run_until_idle() == [Outcome.FAILED, Outcome.DONE]
    failed = status_of(session_factory, ct_id)
    assert failed.status_reason is not None and failed.status_reason.startswith("model:")
    assert "no-such-bundle" in failed.status_reason
    assert status_of(session_factory, mr_id).status is SeriesState.DONE


def test_a_bundle_station_score_is_stored_beside_its_own_score(
    tmp_path: Path, worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    """Each slice row keeps the station score a station's reference learns (the bundle's
    ``station_scoring``), computed from the same components as the score it is judged by."""
    import json

    station = tmp_path / "bundle-station"
    shutil.copytree(Path(worker_settings.model.bundle), station)
    meta = json.loads((station / "model.json").read_text())
    meta["station_scoring"] = {"complexity": True, "complexity_weight": 1.0, "tail_weight": 8.0}
    (station / "model.json").write_text(json.dumps(meta))
    settings = worker_settings.model_copy(
        update={"model": worker_settings.model.model_copy(update={"bundle": station})})
    written = make_series(z=(44, 56))
    series_id = store_and_queue(session_factory, settings, written.paths)
    assert Worker(settings, session_factory).run_until_idle() == [Outcome.DONE]
    with session_factory() as session:
        rows = session.execute(select(SliceScore).where(SliceScore.series_id == series_id)
                               .order_by(SliceScore.slice_index)).scalars().all()
    assert len(rows) == 12
    assert all(r.station_score is not None and np.isfinite(r.station_score) for r in rows)
    assert all(r.bundle_score == r.log_likelihood for r in rows)  # judged out of the box
    assert any(r.station_score != r.log_likelihood for r in rows)


def test_one_scanner_scored_by_its_own_bundle_by_station_name(
    tmp_path: Path, worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    """A bundle calibrated on one scanner scores that scanner's series alone: the worker reads
    the Station Name from the stored headers and the first rule naming it wins."""
    import json

    room3 = tmp_path / "bundle-room3"
    shutil.copytree(Path(worker_settings.model.bundle), room3)
    meta = json.loads((room3 / "model.json").read_text())
    shipped_version = meta["version"]
    meta["version"] = "site-room3"
    (room3 / "model.json").write_text(json.dumps(meta))
    settings = worker_settings.model_copy(
        update={"routing": worker_settings.routing.model_validate({"rules": [
            {"name": "room3", "modality": "MR", "station_name": "mr room 3",
             "model": str(room3)},
            {"name": "mr", "modality": "MR"},
        ]})}
    )
    ids = {}
    for station in ("MR ROOM 3", "MR ROOM 1", None):
        written = make_series(z=(44, 52))
        for path in written.paths:
            ds = pydicom.dcmread(path)
            if station is not None:
                ds.StationName = station
            ds.save_as(path, enforce_file_format=True)
        ids[station] = store_and_queue(session_factory, settings, written.paths)
    assert Worker(settings, session_factory).run_until_idle() == [Outcome.DONE] * 3
    done = {station: status_of(session_factory, i) for station, i in ids.items()}
    assert (done["MR ROOM 3"].routing_rule, done["MR ROOM 3"].model_version) == (
        "room3", "site-room3")
    # These rows were recorded without the scanner (as before revision 0011): the worker
    # fills it in from the headers it read; a series naming no station stays without.
    assert [done[s].station_name for s in ("MR ROOM 3", "MR ROOM 1", None)] == [
        "MR ROOM 3", "MR ROOM 1", None]
    for other in ("MR ROOM 1", None):
        assert (done[other].routing_rule, done[other].model_version) == ("mr", shipped_version)


def test_two_workers_never_double_claim(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    series = [make_series(z=(40 + 3 * i, 50 + 3 * i)) for i in range(6)]
    ids = [store_and_queue(session_factory, worker_settings, s.paths) for s in series]
    bundles = BundleCache()  # shared only to save loading time; claims go through the DB
    results: dict[str, list[Outcome]] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        engine = make_engine(worker_settings.database)  # each worker its own connections
        try:
            worker = Worker(worker_settings, make_session_factory(engine), worker_id=name,
                            bundles=bundles)
            barrier.wait()
            results[name] = worker.run_until_idle()
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(o for r in results.values() for o in r) == [Outcome.DONE] * 6
    with session_factory() as session:
        for series_id in ids:
            claims = session.execute(
                select(SeriesEvent).where(SeriesEvent.series_id == series_id,
                                          SeriesEvent.to_status == "processing")
            ).scalars().all()
            assert len(claims) == 1, f"series {series_id} claimed {len(claims)} times"
            srs = session.execute(
                select(func.count()).select_from(Report)
                .where(Report.series_id == series_id, Report.kind == "SR")
            ).scalar_one()
            assert srs == 1


CLAIM_AND_DIE = """
import os, signal, sys
from node.config import Settings
from node.queue import repo
from node.queue.db import make_engine, make_session_factory
settings = Settings.model_validate_json(sys.argv[1])
factory = make_session_factory(make_engine(settings.database))
with factory() as session:
    series = repo.claim_next_queued(session, "dead-worker", 3600)
print(series.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_worker_recovered_at_start_up_and_reported_once(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    series_id = store_and_queue(session_factory, worker_settings, make_series().paths)
    proc = subprocess.run(
        [sys.executable, "-c", CLAIM_AND_DIE, worker_settings.model_dump_json()],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert int(proc.stdout.split()[0]) == series_id
    left = status_of(session_factory, series_id)
    assert left.status is SeriesState.PROCESSING and left.worker_id == "dead-worker"

    worker = Worker(worker_settings, session_factory, worker_id="restarted")
    assert worker.recover_at_startup() == 1
    assert status_of(session_factory, series_id).status is SeriesState.QUEUED
    assert worker.run_until_idle() == [Outcome.DONE]
    assert worker.run_until_idle() == []
    srs = count(session_factory, select(func.count()).select_from(Report)
                .where(Report.series_id == series_id, Report.kind == "SR"))
    assert srs == 1


def test_expired_leases_requeued_then_abandoned(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    series_id = store_and_queue(session_factory, worker_settings, make_series(z=(40, 44)).paths)
    worker = Worker(worker_settings, session_factory, worker_id="alive")
    max_attempts = worker_settings.worker.max_attempts
    for attempt in range(1, max_attempts + 1):
        with session_factory() as session:
            claimed = repo.claim_next_queued(session, f"gone-{attempt}", lease_s=60)
        assert claimed is not None and claimed.attempts == attempt
        with session_factory() as session:  # the clock moves past the lease
            changed = repo.requeue_expired_leases(session, max_attempts,
                                                  now=utcnow() + timedelta(seconds=61))
        assert [s.id for s in changed] == [series_id]
    series = status_of(session_factory, series_id)
    assert series.status is SeriesState.FAILED and series.status_reason == "abandoned"
    assert worker.run_until_idle() == []


def test_new_instances_after_report_score_again_and_supersede(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    first = make_series(z=(40, 56))
    later = first.paths[12:]
    series_id = store_and_queue(session_factory, worker_settings, first.paths[:12])
    worker = Worker(worker_settings, session_factory)
    assert worker.run_until_idle() == [Outcome.DONE]
    assert status_of(session_factory, series_id).scored_slices == 12

    store_files(session_factory, worker_settings, later)  # the rest arrives after the report
    assert status_of(session_factory, series_id).status is SeriesState.RECEIVING
    queue_series(session_factory, series_id)
    assert worker.run_until_idle() == [Outcome.DONE]
    series = status_of(session_factory, series_id)
    assert series.scored_slices == 16
    with session_factory() as session:
        rows = session.execute(select(SliceScore).where(SliceScore.series_id == series_id)
                               ).scalars().all()
        srs = session.execute(
            select(Report).where(Report.series_id == series_id, Report.kind == "SR")
            .order_by(Report.id)
        ).scalars().all()
    assert len(rows) == 16  # replaced, not appended
    assert [r.superseded for r in srs] == [True, False]
    assert [r.instance_number for r in srs] == [1, 2]


def test_a_straggler_after_retention_is_not_scored_alone_but_a_full_resend_is(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    written = make_series(z=(40, 52))
    series_id = store_and_queue(session_factory, worker_settings, written.paths)
    worker = Worker(worker_settings, session_factory)
    assert worker.run_until_idle() == [Outcome.DONE]
    before = status_of(session_factory, series_id)
    later = utcnow() + timedelta(days=worker_settings.storage.retention_days + 1)
    assert retention.purge_expired(session_factory, worker_settings.storage.dir,
                                   worker_settings.storage.retention_days, now=later) == 1

    store_files(session_factory, worker_settings, written.paths[3:4])  # one image, late
    queue_series(session_factory, series_id)
    assert worker.run_until_idle() == [Outcome.SKIPPED]
    series = status_of(session_factory, series_id)
    assert series.status is SeriesState.SKIPPED and series.status_reason is not None
    assert "1 instance(s) received after the retention job deleted this series' images" \
        in series.status_reason and "11 of the 12 its verdict judged still missing" \
        in series.status_reason
    # The verdict on the whole series, its scores and its one report stand.
    assert (series.abnormal, series.scored_slices, series.scored_at) == (
        before.abnormal, 12, before.scored_at)
    assert count(session_factory, select(func.count()).select_from(SliceScore)) == 12
    assert count(session_factory, select(func.count()).select_from(Report)) == 1

    # Skipped and quiet, its images are deleted again; then the whole series is sent again.
    even_later = later + timedelta(days=worker_settings.storage.retention_days + 1)
    assert retention.purge_expired(session_factory, worker_settings.storage.dir,
                                   worker_settings.storage.retention_days, now=even_later) == 1
    store_files(session_factory, worker_settings, written.paths)
    queue_series(session_factory, series_id)
    assert worker.run_until_idle() == [Outcome.DONE]
    assert status_of(session_factory, series_id).scored_slices == 12
    assert count(session_factory, select(func.count()).select_from(Report)) == 2


def test_series_without_images_skipped(
    tmp_path: Path, worker_settings: Settings, session_factory: sessionmaker[Session],
) -> None:
    folder = tmp_path / "sr"
    folder.mkdir()
    src = series_files(SIEMENS_PHASE)[0]
    sr = sr_in_series(folder, src)
    shutil.copy(src, folder / "unused.dcm")
    series_id = store_and_queue(session_factory, worker_settings, [sr])
    # Routing runs on the headers first: an SR-only series has no image type, modality SR.
    assert Worker(worker_settings, session_factory).run_until_idle() == [Outcome.SKIPPED]
    series = status_of(session_factory, series_id)
    assert series.status is SeriesState.SKIPPED
    assert series.status_reason is not None and "modality SR is not MR" in series.status_reason


def test_new_instance_while_processing_drops_the_result(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    written = make_series(z=(40, 52))
    series_id = store_and_queue(session_factory, worker_settings, written.paths[:-1])
    with session_factory() as session:
        claimed = repo.claim_next_queued(session, "w1", lease_s=60)
    assert claimed is not None and claimed.id == series_id
    # The last instance arrives while w1 is scoring: ingest reopens the series.
    store_files(session_factory, worker_settings, written.paths[-1:])
    outcome = process_series(session_factory, worker_settings, claimed, "w1", BundleCache())
    assert outcome is Outcome.LOST
    series = status_of(session_factory, series_id)
    assert series.status is SeriesState.RECEIVING and series.scored_slices is None
    assert count(session_factory, select(func.count()).select_from(Report)) == 0
    assert count(session_factory, select(func.count()).select_from(SliceScore)) == 0
    queue_series(session_factory, series_id)  # complete now: scored once, with every slice
    assert Worker(worker_settings, session_factory).run_until_idle() == [Outcome.DONE]
    assert status_of(session_factory, series_id).scored_slices == 12


def test_unexpected_error_fails_each_series_and_the_worker_goes_on(
    worker_settings: Settings, session_factory: sessionmaker[Session],
    make_series: Callable[..., WrittenSeries],
) -> None:
    # A device that does not exist: torch raises at scoring time, not at start-up.
    settings = worker_settings.model_copy(
        update={"model": worker_settings.model.model_copy(update={"device": "cuda:99"})}
    )
    ids = [store_and_queue(session_factory, settings, make_series(z=(40 + i, 44 + i)).paths)
           for i in range(2)]
    assert Worker(settings, session_factory).run_until_idle() == [Outcome.FAILED] * 2
    for series_id in ids:
        series = status_of(session_factory, series_id)
        assert series.status is SeriesState.FAILED
        assert series.status_reason is not None and "error" in series.status_reason.lower()
