"""The pages and actions over HTTP, on a database filled by the owners' own functions.

Real stored DICOM files are recorded with the queue's ingest function, scored by the worker's
``process_next`` with a tiny real bundle (which also writes the reports and outbox rows), and
the dashboard runs as a real server. No browser here: these tests read the HTML.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from node.admin.app import start_in_thread
from node.config import Settings
from node.queue import repo, retention
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import upgrade
from node.queue.models import AdminAction, Alert, OutboxEntry, Series, SeriesEvent, utcnow
from node.queue.states import DeliveryState
from node.worker.score import BundleCache, process_next
from tests.admin.web import admin_settings, http

DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
SIEMENS = DICOM / "siemens_trio_gre_field_mapping_2"
PROSTATE = DICOM / "tcia_prostate_t2_0002"


def ingest(factory: sessionmaker[Session], storage: Path, files: list[Path], calling_aet: str,
           received_at: datetime | None = None) -> str:
    """Store files under storage and record them with the queue's ingest function."""
    uid = ""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, storage / rel)
        with factory() as session:
            repo.record_instance(session, repo.InstanceRecord(
                study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=rel,
                size_bytes=f.stat().st_size, instance_number=int(ds.InstanceNumber),
                modality=ds.Modality, series_description=ds.get("SeriesDescription"),
                body_part=ds.get("BodyPartExamined"), calling_aet=calling_aet,
                peer_address="127.0.0.1", received_at=received_at or utcnow()))
        uid = ds.SeriesInstanceUID
    return uid


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path):  # type: ignore[no-untyped-def]
    """Two real series: the Siemens one scored by the worker, the prostate one still
    receiving (an older day, another calling AE). Returns (base URL, settings, factory, uids).

    Module-scoped (scoring takes seconds on this machine); the tests that change the state
    (actions, then the retention job) run last in this file.
    """
    siemens = sorted(SIEMENS.glob("*.dcm"))
    prostate = sorted(PROSTATE.glob("*.dcm"))[:3]
    if not siemens or not prostate:
        pytest.skip("real DICOM series not available")
    base = admin_settings(tmp_path_factory.mktemp("pages"))
    settings = Settings.model_validate({
        **base.model_dump(mode="json"),
        "model": {"bundle": str(tiny_bundle), "device": "cpu"},
        "routing": {"rules": [{"name": "mr", "modality": "MR", "min_abnormal_slices": 1}]},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": "PACS",
                                       "host": "127.0.0.1", "port": 9}]},
    })
    upgrade(settings.database.url)
    engine = make_engine(settings.database)
    factory = make_session_factory(engine)
    old = datetime(2024, 1, 2, 10, 0, tzinfo=UTC)
    prostate_uid = ingest(factory, settings.storage.dir, prostate, "PROSTATE_MR", old)
    siemens_uid = ingest(factory, settings.storage.dir, siemens, "SCANNER1")
    with factory() as session:
        series_id = session.scalars(
            select(Series.id).where(Series.series_instance_uid == siemens_uid)).one()
        repo.mark_queued(session, series_id, idle_before=utcnow() + timedelta(seconds=1))
        session.commit()  # the select above opened the transaction mark_queued joined
    assert process_next(factory, settings, "test-worker", BundleCache()) is not None
    dash = start_in_thread(settings, factory)
    try:
        yield f"http://127.0.0.1:{dash.port}", settings, factory, siemens_uid, prostate_uid
    finally:
        dash.stop()
        engine.dispose()


def _rows(html: str) -> list[str]:
    return re.findall(r'data-series-uid="([^"]+)"', html)


def test_queue_counts_filters_and_order(node) -> None:  # type: ignore[no-untyped-def]
    base, _settings, _factory, siemens, prostate = node
    page = http(f"{base}/queue").text
    assert _rows(page) == [siemens, prostate]  # newest first
    assert '<meta http-equiv="refresh" content="10">' in page
    counts = dict(re.findall(r'data-status="(\w+)">\s*<span[^>]*>\w+</span> <b>(\d+)</b>', page))
    assert counts == {"receiving": "1", "queued": "0", "processing": "0", "done": "1",
                      "skipped": "0", "failed": "0"}
    assert _rows(http(f"{base}/queue?status=done").text) == [siemens]
    assert _rows(http(f"{base}/queue?status=receiving").text) == [prostate]
    assert _rows(http(f"{base}/queue?calling_aet=PROSTATE_MR").text) == [prostate]
    assert _rows(http(f"{base}/queue?modality=CT").text) == []
    assert _rows(http(f"{base}/queue?modality=MR").text) == [siemens, prostate]
    assert _rows(http(f"{base}/queue?date_from=2024-01-02&date_to=2024-01-02").text) == [prostate]
    assert _rows(http(f"{base}/queue?date_from=2024-01-03").text) == [siemens]
    assert http(f"{base}/queue?status=bogus").status == 400
    assert http(f"{base}/queue?date_from=yesterday").status == 400
    assert '<meta http-equiv="refresh" content="5">' in http(f"{base}/queue?refresh=5").text
    assert http(f"{base}/queue?refresh=0").status == 422


def test_series_page_facts_history_scores_and_deliveries(node) -> None:  # type: ignore[no-untyped-def]
    base, _settings, factory, siemens, _prostate = node
    page = http(f"{base}/series/{siemens}").text
    with factory() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == siemens)).one()
        events = session.scalars(
            select(SeriesEvent).where(SeriesEvent.series_id == series.id)).all()
    assert "SIEMENS" in page  # manufacturer from the stored header
    assert "Patient name" not in page and "Siemens^Trio" not in page.lower()
    assert page.count("<tr><td>") >= len(events)
    for e in events:
        assert e.to_status in page
    assert f"{series.abnormal_slices} of {series.scored_slices} slices" in page
    assert page.count('class="thumb thumb-flagged"') == min(series.abnormal_slices or 0, 12)
    assert page.count('class="thumb thumb-normal"') == min(
        (series.scored_slices or 0) - (series.abnormal_slices or 0), 4)
    # The worker wrote an SR (and a KOS when flagged) with an outbox row each, still pending.
    assert "SR" in page and "pending" in page
    assert http(f"{base}/series/{siemens}/plot.png").headers["content-type"] == "image/png"
    assert http(f"{base}/series/1.2.3.4").status == 404
    # No alert URL configured: no alerts table. An alert that failed shows with its error.
    assert 'id="series-alerts"' not in page
    with factory.begin() as session:
        session.add(Alert(series_id=series.id, url="https://chat.example/hook", payload="{}",
                          state="failed", attempts=5, last_error="HTTPError: HTTP Error 500"))
    page = http(f"{base}/series/{siemens}").text
    # The URL as the logs show it: a webhook's path holds its secret.
    assert 'id="series-alerts"' in page and "https://chat.example/..." in page
    assert "/hook" not in page and "HTTP Error 500" in page


def test_alerts_page_lists_flag_and_problem_alerts(node) -> None:  # type: ignore[no-untyped-def]
    base, _settings, factory, siemens, _prostate = node
    with factory.begin() as session:
        series_id = session.scalars(
            select(Series.id).where(Series.series_instance_uid == siemens)).one()
        flag = {"event": "series_flagged", "abnormal_slices": 4, "scored_slices": 36,
                "series_description": "gre_field_mapping", "station_name": "MRC35389"}
        session.add(Alert(series_id=series_id, url="https://hooks.example/T0/secret",
                          payload=json.dumps(flag), state="sent", attempts=1,
                          sent_at=utcnow(), created_at=utcnow() - timedelta(minutes=5)))
        problem = {"event": "delivery_failing", "title": "reports are not reaching pacs"}
        session.add(Alert(series_id=None, url="mailto:pacs-admin@hospital.example.org",
                          payload=json.dumps(problem), state="pending", attempts=2,
                          last_error="SMTPServerDisconnected: lost", event="delivery_failing",
                          problem_key="pacs", created_at=utcnow()))
    page = http(f"{base}/alerts").text
    assert 'id="nav-alerts"' in page
    rows = re.findall(r'<tr class="alert-row" data-event="(\w+)">(.*?)</tr>', page, re.S)
    events = [e for e, _ in rows]
    assert events.index("delivery_failing") < events.index("series_flagged")  # newest first
    problem_row = next(r for e, r in rows if e == "delivery_failing")
    assert "reports are not reaching pacs" in problem_row and "(pacs)" in problem_row
    assert "mailto:...@hospital.example.org" in problem_row and "pacs-admin" not in page
    assert "SMTPServerDisconnected" in problem_row and "next " in problem_row
    flag_row = next(r for e, r in rows if e == "series_flagged" and "hooks.example" in r)
    assert f'/series/{siemens}"' in flag_row
    assert "series flagged: 4/36 images of &#39;gre_field_mapping&#39; from MRC35389" in flag_row
    assert "https://hooks.example/..." in flag_row and "secret" not in page


def test_patient_name_only_when_configured(tmp_path, node, session_factory_for,  # type: ignore[no-untyped-def]
                                           run_dashboard) -> None:
    _base, settings, factory, siemens, _prostate = node
    shown = Settings.model_validate({**settings.model_dump(mode="json"),
                                     "admin": {**settings.admin.model_dump(mode="json"),
                                               "show_patient_name": True}})
    dash = run_dashboard(shown, factory)
    page = http(f"http://127.0.0.1:{dash.port}/series/{siemens}").text
    name = str(pydicom.dcmread(sorted(SIEMENS.glob("*.dcm"))[0]).PatientName)
    assert 'id="patient-name"' in page and name in page


def _post(url: str, **form: str):  # type: ignore[no-untyped-def]
    return http(url, data=urllib.parse.urlencode(form).encode(), follow=False)


def test_associations_page(node) -> None:  # type: ignore[no-untyped-def]
    base, _settings, factory, _siemens, _prostate = node
    with factory() as session:
        assoc = repo.open_association(session, calling_aet="SCANNER1", called_aet="VAENODE",
                                      peer_address="127.0.0.1:40000")
        repo.close_association(session, assoc, result="released", instances=36, failed=1)
        repo.record_rejected_association(session, calling_aet="INTRUDER", called_aet="VAENODE",
                                         peer_address="127.0.0.1:40001",
                                         reason="calling AE title not allowed")
    page = http(f"{base}/associations").text
    assert "SCANNER1" in page and "released" in page and ">36<" in page
    assert page.index("INTRUDER") < page.index("SCANNER1")  # newest first
    assert "rejected: calling AE title not allowed" in page


def test_actions_are_recorded_and_refused_when_they_do_not_apply(node) -> None:  # type: ignore[no-untyped-def]
    base, _settings, factory, siemens, prostate = node
    url = f"{base}/series/{siemens}/actions"
    # A series still receiving has no verdict and cannot be re-scored.
    refused = _post(f"{base}/series/{prostate}/actions", action="retry", reviewer="carol")
    assert refused.status == 409 and "re-score" in refused.text
    assert _post(url, action="explode").status == 409

    assert _post(url, action="resend", reviewer="carol", note="PACS was down").status == 303
    with factory() as session:
        session.execute(update(OutboxEntry).values(state=DeliveryState.FAILED, attempts=10,
                                                   last_error="association rejected"))
        session.commit()
    deliveries = http(f"{base}/deliveries").text
    assert "association rejected" in deliveries and "failed" in deliveries
    assert _post(url, action="resend", reviewer="carol").status == 303
    with factory() as session:
        states = session.scalars(select(OutboxEntry.state)).all()
    assert states and all(s is DeliveryState.PENDING for s in states)

    assert _post(url, action="confirm", reviewer="carol", note="agreed").status == 303
    assert _post(url, action="retry", reviewer="carol").status == 303
    with factory() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == siemens)).one()
        actions = session.scalars(select(AdminAction).order_by(AdminAction.id)).all()
        last_event = session.scalars(select(SeriesEvent).where(SeriesEvent.series_id == series.id)
                                     .order_by(SeriesEvent.id.desc())).first()
    assert str(series.status) == "queued"
    assert last_event is not None and last_event.actor == "admin:carol"
    assert [(a.action, a.actor) for a in actions] == [
        ("resend", "carol"), ("resend", "carol"), ("confirm", "carol"), ("retry", "carol")]
    assert actions[2].model == "tiny-test 0.0.1" and actions[2].note == "agreed"
    page = http(f"{base}/series/{siemens}").text
    assert page.count('class="action-row"') == 4 and "PACS was down" in page
    # Queued again: a review no longer applies until it is scored again.
    assert _post(url, action="confirm", reviewer="carol").status == 409


def test_pages_are_served_while_ingest_holds_the_write_lock(node) -> None:  # type: ignore[no-untyped-def]
    """A writer (ingest committing, a worker storing scores) holds SQLite's write lock: the
    dashboard reads a snapshot meanwhile instead of waiting for it (or holding it up)."""
    base, _settings, factory, siemens, prostate = node
    with factory.begin() as writer:
        writer.execute(text("UPDATE series SET modality = 'CT' WHERE series_instance_uid = :u"),
                       {"u": prostate})
        # The dashboard's busy timeout is 30 s and urllib's 30 s: a page that waited for this
        # lock would not come back within either.
        for path in ("/queue", f"/series/{siemens}", "/deliveries", "/associations", "/models",
                     "/metrics", "/healthz"):
            reply = http(f"{base}{path}")
            assert reply.status == 200, (path, reply.status, reply.text[:300])
        # The uncommitted change is not visible to them.
        assert _rows(http(f"{base}/queue?modality=CT").text) == []
    assert _rows(http(f"{base}/queue?modality=CT").text) == [prostate]
    # The models page says what each routing rule takes, in words.
    assert 'class="rules"' in http(f"{base}/models").text
    with factory.begin() as writer:
        writer.execute(text("UPDATE series SET modality = 'MR' WHERE series_instance_uid = :u"),
                       {"u": prostate})


def test_a_series_whose_images_were_deleted(node) -> None:  # type: ignore[no-untyped-def]
    """After the retention job (runs last: it deletes the Siemens series' stored files): the
    page says so instead of drawing thumbnails, keeps the verdict, and offers no re-score."""
    base, settings, factory, siemens, _prostate = node
    with factory.begin() as session:  # finished long ago
        session.execute(update(Series).where(Series.series_instance_uid == siemens)
                        .values(status="done"))
    later = utcnow() + timedelta(days=settings.storage.retention_days + 1)
    assert retention.purge_expired(factory, settings.storage.dir, settings.storage.retention_days,
                                   now=later) == 1
    page = http(f"{base}/series/{siemens}").text
    assert 'id="purged"' in page and "retention policy" in page
    assert 'class="thumb' not in page
    assert "slices below the threshold" in page  # the verdict stays
    assert 'id="action-retry"' not in page
    refused = _post(f"{base}/series/{siemens}/actions", action="retry", reviewer="carol")
    assert refused.status == 409 and "retention" in refused.text
