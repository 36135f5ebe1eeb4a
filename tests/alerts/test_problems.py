"""Problems of the node told to ``[alerts].ops_urls``: reports a PACS does not take, storage
running out, a stalled queue; once per problem and key per repeat window; end to end through a
real ``vaenode serve``."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.alerts import jobs, problems
from node.alerts.mail import subject
from node.config import Settings
from node.queue.migrate import alembic_config, upgrade
from node.queue.models import Alert, OutboxEntry, Series, utcnow
from node.queue.states import DeliveryState, SeriesState
from node.report.jobs import deliver_due
from node.report.service import report_series
from tests.helpers.alerts import AlertReceiver
from tests.helpers.db import insert_done_series
from tests.helpers.node import start_node
from tests.helpers.orthanc import free_port
from tests.helpers.reports import DATA, add_series, make_verdict

Factory = sessionmaker[Session]
SERIES_DIR = DATA / "dicom" / "siemens_trio_gre_field_mapping_2"


def _settings(tmp_path: Path, receiver: AlertReceiver, **alerts: Any) -> Settings:
    return Settings.model_validate({
        "dicom": {"ae_title": "QCNODE", "acse_timeout_s": 2, "network_timeout_s": 2},
        "storage": {"dir": str(tmp_path / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp_path / 'q.db'}"},
        "delivery": {"max_attempts": 1, "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]},
        "alerts": {"ops_urls": [receiver.url], **alerts},
    })


def _problem_rows(factory: Factory) -> list[tuple[str, str | None, str]]:
    with factory() as s:
        return [(a.event, a.problem_key, a.url) for a in s.scalars(
            select(Alert).where(Alert.series_id.is_(None)).order_by(Alert.id))]


def _queued_series(factory: Factory, uid: str, waited: timedelta) -> None:
    now = utcnow()
    with factory.begin() as s:
        s.add(Series(study_instance_uid="1.2", series_instance_uid=uid, instance_count=1,
                     first_received_at=now - waited, last_received_at=now - waited,
                     status=SeriesState.QUEUED, attempts=0, updated_at=now - waited))


def test_reports_a_pacs_does_not_take_are_told_once_per_repeat_window(
        factory: Factory, tmp_path: Path, receiver: AlertReceiver) -> None:
    settings = _settings(tmp_path, receiver, ops_delivery_wait_min=15.0, ops_repeat_h=4.0,
                         ops_storage_free_mb=0)
    files = sorted(SERIES_DIR.glob("*.dcm"))
    if not files:
        pytest.skip(f"no DICOM series under {SERIES_DIR}")
    sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files),
                     key=lambda d: int(d.InstanceNumber))
    add_series(factory, settings.storage.dir, files)
    with factory.begin() as s:
        report_series(s, settings, make_verdict(sources, {3, 4, 5}), sources)  # SR and KOS
    now = utcnow()
    assert problems.check(factory, settings, now) == 0  # just made: not overdue yet
    # Nobody listens on the destination's port: one attempt each, then given up.
    deliver_due(factory, settings)
    with factory() as s:
        assert [r.state for r in s.scalars(select(OutboxEntry))] == [DeliveryState.FAILED] * 2
    assert problems.check(factory, settings, now) == 1
    assert _problem_rows(factory) == [("delivery_failing", "pacs", receiver.url)]
    assert jobs.send_due(factory, settings.alerts) == 1
    assert problems.check(factory, settings, now + timedelta(hours=3)) == 0  # told already
    # A report still waiting after ops_delivery_wait_min counts too.
    later = now + timedelta(hours=4, minutes=1)
    with factory.begin() as s:
        s.execute(update(OutboxEntry).where(OutboxEntry.id == 1).values(
            state=DeliveryState.PENDING, created_at=later - timedelta(minutes=20)))
    assert problems.check(factory, settings, later) == 1
    with factory.begin() as s:  # made "4 hours later": due now for the sender
        s.execute(update(Alert).values(next_attempt_at=utcnow()))
    assert jobs.send_due(factory, settings.alerts) == 1
    first, second = receiver.messages
    assert first["event"] == "delivery_failing" and first["destination"] == "pacs"
    assert (first["overdue"], first["given_up"]) == (0, 2)
    assert (second["overdue"], second["given_up"]) == (1, 1)
    assert first["text"].startswith(
        "vaenode QCNODE: reports are not reaching pacs (PACS@127.0.0.1:")
    assert ("2 given up in the last 24 h; last error: cannot connect to PACS@127.0.0.1"
            in first["text"])
    assert "vaenode echo PACS@127.0.0.1:" in first["text"]
    assert "1 not delivered after 15 min, 1 given up" in second["text"]
    assert subject(first) == "[vaenode QCNODE] reports are not reaching pacs"
    # Given up more than a day ago and left so: no longer a problem, no reminder for ever.
    with factory.begin() as s:
        s.execute(update(OutboxEntry).values(state=DeliveryState.FAILED))
        assert problems.delivery_problems(s, settings, later + timedelta(days=1)) == []


def test_storage_running_out_and_a_stalled_queue(factory: Factory, tmp_path: Path,
                                                 receiver: AlertReceiver) -> None:
    (tmp_path / "storage").mkdir()
    settings = _settings(tmp_path, receiver, ops_storage_free_mb=10**9, ops_queue_wait_min=15)
    _queued_series(factory, "1.2.1", timedelta(minutes=10))
    assert problems.check(factory, settings) == 1  # the storage; the queue waited 10 min
    _queued_series(factory, "1.2.2", timedelta(minutes=25))
    assert problems.check(factory, settings) == 1  # the queue; the storage was told already
    assert [e for e, _, _ in _problem_rows(factory)] == ["storage_low", "queue_stalled"]
    assert jobs.send_due(factory, settings.alerts) == 2
    storage, queue = receiver.messages
    assert storage["storage"] == str(tmp_path / "storage") and storage["free_mb"] < 10**9
    assert "MiB free on" in storage["text"] and "retention_days" in storage["text"]
    assert queue["queued"] == 2 and queue["waited_min"] >= 25
    assert "the oldest of 2 queued series has waited 25 min" in queue["text"]
    assert all(m["node"] == "QCNODE" for m in receiver.messages)
    # Without ops_urls nothing is made; a healthy node has no problem.
    quiet = Settings.model_validate({**settings.model_dump(), "alerts": {}})
    assert problems.check(factory, quiet) == 0
    healthy = _settings(tmp_path, receiver, ops_storage_free_mb=0, ops_queue_wait_min=60,
                        ops_repeat_h=1e-6)  # (so that no earlier message holds one back)
    assert problems.check(factory, healthy) == 0
    assert problems.check(factory, _settings(tmp_path, receiver, ops_repeat_h=1e-6)) == 1


def test_migration_0012_keeps_flag_alerts_and_drops_problem_rows_on_downgrade(
        tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0011_series_scanner")
    t0 = "2026-11-26 08:00:00"
    with sqlite3.connect(tmp_path / "old.db") as db:
        insert_done_series(db, 1, "1.2.1", t0)
        db.execute("INSERT INTO alerts (series_id, url, payload, state, attempts, "
                   "next_attempt_at, created_at) VALUES (1, 'http://x/', '{}', 'sent', 1, ?, ?)",
                   (t0, t0))
    upgrade(url)
    with sqlite3.connect(tmp_path / "old.db") as db:
        assert db.execute("SELECT series_id, event, problem_key FROM alerts").fetchall() == [
            (1, "series_flagged", None)]
        db.execute("INSERT INTO alerts (series_id, url, payload, state, attempts, "
                   "next_attempt_at, created_at, event, problem_key) VALUES "
                   "(NULL, 'http://x/', '{}', 'pending', 0, ?, ?, 'storage_low', '/s')",
                   (t0, t0))
        # The series' other rows are still tied to it: deleting it deletes its alerts.
        assert db.execute("PRAGMA foreign_key_list(alerts)").fetchall()[0][6] == "CASCADE"
    command.downgrade(alembic_config(url), "0011_series_scanner")
    with sqlite3.connect(tmp_path / "old.db") as db:
        assert db.execute("SELECT series_id, url FROM alerts").fetchall() == [(1, "http://x/")]
    upgrade(url)


def test_serve_tells_a_problem_to_the_ops_url(tmp_path: Path, receiver: AlertReceiver) -> None:
    """Through a real ``vaenode serve``: the check runs on its schedule, the sender posts."""
    node = start_node(tmp_path / "node", sections={"alerts": {
        "ops_urls": [receiver.url], "ops_storage_free_mb": 10**9, "ops_check_s": 0.5,
        "poll_interval_s": 0.5}})
    try:
        deadline = time.monotonic() + 30
        while not receiver.messages and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # further checks within the repeat window tell nothing more
    finally:
        assert node.stop() == 0
    [message] = receiver.messages
    assert message["event"] == "storage_low" and message["node"] == "VAENODE"
    assert "node problem: storage is running out" in node.log_text()
    assert json.loads(json.dumps(message))["storage"].endswith("storage")
