"""Reports stored and queued in the database, then delivered by the job, retries included."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import DeliverySettings, Settings
from node.queue.db import make_engine, make_session_factory
from node.queue.models import OutboxEntry, Report, utcnow
from node.queue.states import DeliveryState
from node.report import outbox
from node.report.jobs import deliver_due
from node.report.service import report_series
from tests.helpers.orthanc import Orthanc, free_port
from tests.helpers.reports import add_series, kos_references, make_verdict

FLAGGED = {7, 8, 9, 10}


def _report(
    session_factory: sessionmaker[Session],
    settings: Settings,
    sources: list[Dataset],
    flagged: set[int] = FLAGGED,
    *,
    from_storage: bool = False,
) -> list[Report]:
    verdict = make_verdict(sources, flagged)
    with session_factory.begin() as session:
        return report_series(session, settings, verdict, None if from_storage else sources)


def _rows(session_factory: sessionmaker[Session]) -> list[OutboxEntry]:
    with session_factory() as session:
        return list(session.scalars(select(OutboxEntry).order_by(OutboxEntry.id)))


def _deliver_until(
    session_factory: sessionmaker[Session],
    settings: Settings,
    done: Callable[[list[OutboxEntry]], bool],
    timeout_s: float,
    between: Callable[[float], None] | None = None,
) -> list[OutboxEntry]:
    """Run the delivery job the way the scheduler would, until ``done`` or timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        deliver_due(session_factory, settings)
        rows = _rows(session_factory)
        if done(rows):
            return rows
        if between:
            between(time.monotonic() - start)
        time.sleep(0.1)
    raise AssertionError(f"delivery did not settle in {timeout_s} s: {_rows(session_factory)}")


def test_report_is_stored_and_queued_per_destination(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for(
        [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 4243},
        ]
    )
    add_series(session_factory, settings.storage.dir, source_files)
    reports = _report(session_factory, settings, sources, from_storage=True)
    assert [r.kind for r in reports] == ["SR", "KOS"]
    for r in reports:
        path = settings.storage.dir / r.path
        assert path.is_file() and path.parts[-4] == "reports"
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == r.sop_instance_uid
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert not list(settings.storage.dir.rglob(".tmp-*"))
    rows = _rows(session_factory)
    assert [(r.destination, r.state) for r in rows] == [
        ("pacs", DeliveryState.PENDING),
        ("archive", DeliveryState.PENDING),
    ] * 2


def test_new_report_supersedes_the_old_in_the_same_series(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for()
    add_series(session_factory, settings.storage.dir, source_files)
    first = _report(session_factory, settings, sources)
    second = _report(session_factory, settings, sources, flagged={1, 2, 3, 4, 5})
    with session_factory() as session:
        rows = session.scalars(select(Report).order_by(Report.id)).all()
    assert [(r.kind, r.instance_number, r.superseded) for r in rows] == [
        ("SR", 1, True),
        ("KOS", 1, True),
        ("SR", 2, False),
        ("KOS", 2, False),
    ]
    assert second[0].series_instance_uid == first[0].series_instance_uid
    new_sr = pydicom.dcmread(settings.storage.dir / second[0].path)
    pred = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first[0].sop_instance_uid


def test_pacs_down_then_up_gets_the_report_exactly_once(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
    orthanc: Orthanc,
) -> None:
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        retry_base_s=0.5,
        retry_max_s=2.0,
    )
    orthanc.stop()  # the PACS is down when the report is ready
    add_series(session_factory, settings.storage.dir, source_files)
    reports = _report(session_factory, settings, sources)

    def bring_up(elapsed_s: float) -> None:
        if elapsed_s > 3.0 and orthanc.proc is None:
            orthanc.start()

    rows = _deliver_until(
        session_factory,
        settings,
        lambda rows: all(r.state is DeliveryState.SENT for r in rows),
        timeout_s=40,
        between=bring_up,
    )
    assert all(r.attempts >= 2 and r.last_error is None and r.sent_at for r in rows)
    # Running the job again sends nothing more.
    assert deliver_due(session_factory, settings) == 0
    srs, koss = orthanc.reports("SR"), orthanc.reports("KO")
    assert [d.SOPInstanceUID for d in srs] == [reports[0].sop_instance_uid]
    assert [d.SOPInstanceUID for d in koss] == [reports[1].sop_instance_uid]
    assert len(orthanc.instance_ids()) == 2


def test_pending_deliveries_of_a_superseded_report_are_withdrawn(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
    orthanc: Orthanc,
) -> None:
    """PACS down, the series is scored again (now nothing flagged) before it comes back: PACS
    gets the new SR only, not the old SR nor the old "Quality Issue" KOS after it."""
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}],
        retry_base_s=0.2,
        retry_max_s=0.5,
    )
    orthanc.stop()
    add_series(session_factory, settings.storage.dir, source_files)
    old = _report(session_factory, settings, sources)  # SR + KOS
    assert deliver_due(session_factory, settings) == 0  # a failed attempt each: still pending
    assert all(r.state is DeliveryState.PENDING and r.attempts == 1
               for r in _rows(session_factory))
    new = _report(session_factory, settings, sources, flagged=set())  # SR only
    orthanc.start()
    rows = _deliver_until(
        session_factory, settings,
        lambda rows: any(r.state is DeliveryState.SENT for r in rows), timeout_s=30,
    )
    by_report = {r.report_id: r.state for r in rows}
    with session_factory() as session:
        ids = {r.sop_instance_uid: r.id for r in session.scalars(select(Report))}
    assert by_report == {
        ids[old[0].sop_instance_uid]: DeliveryState.SUPERSEDED,
        ids[old[1].sop_instance_uid]: DeliveryState.SUPERSEDED,
        ids[new[0].sop_instance_uid]: DeliveryState.SENT,
    }
    assert deliver_due(session_factory, settings) == 0
    assert [d.SOPInstanceUID for d in orthanc.reports("SR")] == [new[0].sop_instance_uid]
    assert orthanc.reports("KO") == []
    # resend re-delivers the current report only.
    with session_factory.begin() as session:
        assert outbox.resend_series(session, str(sources[0].SeriesInstanceUID)) == 1


def test_a_delivered_quality_flag_is_withdrawn_by_a_rejection_note(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
    orthanc: Orthanc,
) -> None:
    """The "Quality Issue" KOS reached the PACS; the series is scored again and nothing is
    flagged: the PACS gets the new SR and an IOCM rejection note naming the stale KOS (only
    it), and a destination that never got the KOS gets no note."""
    settings = settings_for([
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port},
        {"name": "later", "ae_title": "LATER", "host": "127.0.0.1", "port": free_port()},
    ], retry_base_s=60.0)
    series_uid = add_series(session_factory, settings.storage.dir, source_files)
    old_sr, old_kos = _report(session_factory, settings, sources)
    deliver_due(session_factory, settings)  # pacs: both sent; later: nobody listens, pending
    with session_factory() as session:
        sent = {(v.kind, v.destination): v.state for v in outbox.deliveries(session, series_uid)}
    assert sent == {("SR", "pacs"): "sent", ("KOS", "pacs"): "sent",
                    ("SR", "later"): "pending", ("KOS", "later"): "pending"}

    rescored = _report(session_factory, settings, sources, flagged=set())
    assert [r.kind for r in rescored] == ["SR", "REJECT"]
    note_row = rescored[1]
    with session_factory() as session:
        queued = {(v.kind, v.destination, v.superseded): v.state
                  for v in outbox.deliveries(session, series_uid)
                  if v.sop_instance_uid in {r.sop_instance_uid for r in rescored}}
    assert queued == {("SR", "pacs", False): "pending", ("SR", "later", False): "pending",
                      ("REJECT", "pacs", False): "pending"}
    assert deliver_due(session_factory, settings) == 2  # 'later' is not due yet (back-off)

    kos_in_pacs = {str(d.SOPInstanceUID): d for d in orthanc.reports("KO")}
    assert set(kos_in_pacs) == {old_kos.sop_instance_uid, note_row.sop_instance_uid}
    note = kos_in_pacs[note_row.sop_instance_uid]
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert kos_references(note) == [old_kos.sop_instance_uid]
    assert note.StudyInstanceUID == sources[0].StudyInstanceUID
    assert {str(d.SOPInstanceUID) for d in orthanc.reports("SR")} == {
        old_sr.sop_instance_uid, rescored[0].sop_instance_uid}

    # Scored once more, flagged again: the stale KOS was already withdrawn, nothing more to
    # reject, and the new KOS goes out as usual.
    third = _report(session_factory, settings, sources)
    assert [r.kind for r in third] == ["SR", "KOS"]
    # And when that KOS is withdrawn in turn, the note is the next in the note series.
    deliver_due(session_factory, settings)
    fourth = _report(session_factory, settings, sources, flagged=set())
    assert [r.kind for r in fourth] == ["SR", "REJECT"]
    assert fourth[1].instance_number == 2
    assert fourth[1].series_instance_uid == note_row.series_instance_uid


def test_backoff_schedule_survives_a_restart(
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        retry_base_s=30.0,
        retry_max_s=100.0,
    )
    add_series(session_factory, settings.storage.dir, source_files)
    _report(session_factory, settings, sources, flagged=set())  # SR only
    before = utcnow()
    assert deliver_due(session_factory, settings) == 0
    [row] = _rows(session_factory)
    assert row.state is DeliveryState.PENDING and row.attempts == 1
    assert "cannot connect" in (row.last_error or "")
    assert 29 <= (row.next_attempt_at - before).total_seconds() <= 31

    # A "restarted" node: new engine and sessions on the same database file.
    engine = make_engine(settings.database)
    try:
        restarted = make_session_factory(engine)
        assert deliver_due(restarted, settings) == 0
        [again] = _rows(restarted)
        assert (again.attempts, again.next_attempt_at) == (1, row.next_attempt_at)
    finally:
        engine.dispose()

    delivery = DeliverySettings(retry_base_s=30.0, retry_max_s=100.0)
    assert [outbox.backoff_s(n, delivery) for n in range(1, 6)] == [30, 60, 100, 100, 100]


def test_attempts_run_out_then_failed_with_last_error(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        retry_base_s=0.05,
        retry_max_s=0.1,
        max_attempts=3,
    )
    add_series(session_factory, settings.storage.dir, source_files)
    _report(session_factory, settings, sources, flagged=set())
    [row] = _deliver_until(
        session_factory,
        settings,
        lambda rows: rows[0].state is DeliveryState.FAILED,
        timeout_s=20,
    )
    assert row.attempts == 3
    assert "cannot connect to PACS@127.0.0.1" in (row.last_error or "")
    time.sleep(0.2)
    assert deliver_due(session_factory, settings) == 0
    assert _rows(session_factory)[0].attempts == 3


def test_resend_delivers_the_current_reports_again(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
    orthanc: Orthanc,
) -> None:
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}]
    )
    series_uid = add_series(session_factory, settings.storage.dir, source_files)
    _report(session_factory, settings, sources)
    assert deliver_due(session_factory, settings) == 2
    with session_factory.begin() as session:
        assert outbox.resend_series(session, series_uid) == 2
    with session_factory() as session:
        states = {r.state for r in outbox.deliveries(session, series_uid)}
    assert states == {"pending"}
    assert deliver_due(session_factory, settings) == 2
    with session_factory() as session:
        view = outbox.deliveries(session, series_uid)
    assert [(v.kind, v.state, v.attempts) for v in view] == [("SR", "sent", 1), ("KOS", "sent", 1)]
    # Same SOP Instance UIDs: the PACS still holds one SR and one KOS.
    assert len(orthanc.instance_ids()) == 2


def test_a_claimed_row_is_not_claimed_twice(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]
    )
    add_series(session_factory, settings.storage.dir, source_files)
    _report(session_factory, settings, sources, flagged=set())
    [row] = _rows(session_factory)
    first = outbox.claim(session_factory, row.id, lease_s=60)
    assert first is not None
    assert outbox.claim(session_factory, row.id, lease_s=60) is None
    with session_factory() as session:
        assert outbox.due_ids(session, utcnow(), 10) == []


@pytest.mark.parametrize("flagged", [set(), FLAGGED])
def test_kos_only_when_flagged(
    flagged: set[int],
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    settings = settings_for()
    add_series(session_factory, settings.storage.dir, source_files)
    kinds = [r.kind for r in _report(session_factory, settings, sources, flagged=flagged)]
    assert kinds == (["SR", "KOS"] if flagged else ["SR"])


def test_prepared_reports_are_stored_as_built_unless_stale(
    session_factory: sessionmaker[Session],
    settings_for: Callable[..., Settings],
    source_files: list[Path],
    sources: list[Dataset],
) -> None:
    from node.report.service import prepare_reports

    settings = settings_for()
    add_series(session_factory, settings.storage.dir, source_files)
    verdict = make_verdict(sources, FLAGGED)
    prepared = prepare_reports(session_factory, settings, verdict, sources)
    with session_factory.begin() as session:
        [sr, _] = report_series(session, settings, verdict, sources, prepared)
    assert sr.sop_instance_uid == prepared.sr[0].SOPInstanceUID
    assert (settings.storage.dir / sr.path).read_bytes() == prepared.sr[1]

    # Built before another report was stored: rebuilt, so it supersedes that one too.
    stale = prepare_reports(session_factory, settings, verdict, sources)
    _report(session_factory, settings, sources)
    with session_factory.begin() as session:
        [newest, _] = report_series(session, settings, verdict, sources, stale)
    assert newest.sop_instance_uid != stale.sr[0].SOPInstanceUID
    assert newest.instance_number == 3
