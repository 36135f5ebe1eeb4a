"""Alerts on flagged series: made with the verdict, posted to a real HTTP endpoint on
loopback, retried when it fails, given up after the attempts run out."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.alerts import jobs, outbox
from node.config import AlertSettings
from node.queue.models import Alert, Series
from tests.helpers.alerts import AlertReceiver, scored_series
from tests.helpers.orthanc import free_port

Factory = sessionmaker[Session]


def _rows(factory: Factory) -> list[Alert]:
    with factory() as s:
        return list(s.scalars(select(Alert).order_by(Alert.id)))


def test_a_flagged_series_is_posted_to_every_url(factory: Factory, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    first, second = AlertReceiver(), AlertReceiver()
    try:
        # The first endpoint wants a token; it goes to that URL only.
        settings = AlertSettings(urls=[first.url, second.url],
                                 headers={first.url: {"Authorization": "Bearer s3cret"}},
                                 dashboard_url="https://qc.example.org:8080/")
        caplog.set_level(logging.INFO, logger="node.alerts.jobs")
        uid, added = scored_series(factory, tmp_path, {1, 2, 3, 4}, settings, station="CT ROOM 2")
        assert added == 2
        assert jobs.send_due(factory, settings) == 2
        assert jobs.send_due(factory, settings) == 0  # sent once
        for r in (first, second):
            [msg] = r.messages
            assert msg["content_type"] == "application/json"
            assert msg["event"] == "series_flagged" and msg["series_instance_uid"] == uid
            assert (msg["abnormal_slices"], msg["scored_slices"]) == (4, 6)
            assert msg["calling_aet"] == "CT1" and msg["series_description"] == "Head routine"
            assert msg["station_name"] == "CT ROOM 2"
            assert msg["dashboard_url"] == f"https://qc.example.org:8080/series/{uid}"
            # The technologist knows the scanner by its Station Name; the AE may be a gateway.
            assert "4 of 6 images of 'Head routine' from CT ROOM 2 (AE CT1)" in msg["text"]
            assert "Synthetic" not in json.dumps(msg)  # never the patient's name
        assert [(a.state, a.attempts) for a in _rows(factory)] == [("sent", 1), ("sent", 1)]
        assert first.messages[0]["authorization"] == "Bearer s3cret"
        assert second.messages[0]["authorization"] is None
        # Logs name the endpoint's host, not its path (where webhooks keep their secret).
        logged = [getattr(r, "url", None) for r in caplog.records if r.message == "alert sent"]
        host = first.url.split("/")[2]
        assert logged == [f"http://{host}/...", f"http://{second.url.split('/')[2]}/..."]
        assert "/hook" not in caplog.text and "s3cret" not in caplog.text
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(("headers", "error"), [
    ({"http://elsewhere/hook": {"Authorization": "x"}}, "not one of alerts.urls"),
    ({"http://127.0.0.1:9/hook": {"Bad Name": "x"}}, "not an HTTP header name"),
    ({"http://127.0.0.1:9/hook": {"Content-Type": "text/plain"}}, "set by the node"),
    ({"http://127.0.0.1:9/hook": {"X-Token": "a\r\nX-Evil: 1"}}, "line break"),
])
def test_bad_alert_headers_are_refused(headers: dict[str, dict[str, str]], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        AlertSettings(urls=["http://127.0.0.1:9/hook"], headers=headers)


def test_url_shown_in_logs() -> None:
    assert jobs.shown("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/..."
    assert jobs.shown("https://user:pw@alerts.local:8443/a?t=1") == "https://alerts.local:8443/..."


def test_a_normal_series_or_no_url_makes_no_alert(factory: Factory, tmp_path: Path,
                                                  receiver: AlertReceiver) -> None:
    _, added = scored_series(factory, tmp_path, {1}, AlertSettings(urls=[receiver.url]))
    assert added == 0  # 1 of 6 flagged, 3 make the series abnormal
    _, added = scored_series(factory, tmp_path / "b", {1, 2, 3}, AlertSettings())
    assert added == 0 and _rows(factory) == []


def test_a_failing_endpoint_is_retried_then_given_up(factory: Factory, tmp_path: Path,
                                                     receiver: AlertReceiver) -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"  # nobody listens
    settings = AlertSettings(urls=[receiver.url, down], max_attempts=3, retry_base_s=0.5,
                             retry_max_s=0.5, timeout_s=2.0)
    scored_series(factory, tmp_path, {0, 1, 2}, settings)
    receiver.fail_next = 1  # answers 500 once
    assert jobs.send_due(factory, settings) == 0
    rows = _rows(factory)
    assert [(a.state, a.attempts) for a in rows] == [("pending", 1), ("pending", 1)]
    assert "500" in (rows[0].last_error or "") and rows[1].last_error
    assert outbox.due(factory, lease_s=1.0, limit=10) == []  # not before the backoff
    time.sleep(0.6)
    assert jobs.send_due(factory, settings) == 1  # the webhook is back; the dead URL is not
    time.sleep(0.6)
    assert jobs.send_due(factory, settings) == 0
    rows = _rows(factory)
    assert [(a.state, a.attempts) for a in rows] == [("sent", 2), ("failed", 3)]
    assert len(receiver.messages) == 1 and receiver.requests == 2


def test_alert_test_command_checks_every_url(tmp_path: Path, receiver: AlertReceiver) -> None:
    """``vaenode alert-test``: what ``vaenode echo`` is for a PACS, for the alert URLs."""
    vaenode = Path(sys.executable).with_name("vaenode")
    down = f"http://127.0.0.1:{free_port()}/hook"
    config = tmp_path / "node.toml"
    config.write_text(f'[alerts]\nurls = ["{receiver.url}"]\ntimeout_s = 3.0\n'
                      f'[alerts.headers."{receiver.url}"]\nAuthorization = "Bearer t0ken"\n',
                      encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(vaenode), "alert-test", "--config", str(config), *args],
                              capture_output=True, text=True, timeout=60)

    ok = run()
    assert ok.returncode == 0 and "delivered" in ok.stdout, ok.stderr
    [msg] = receiver.messages
    assert msg["event"] == "test" and "VAENODE" in msg["text"]
    assert msg["authorization"] == "Bearer t0ken"
    bad = run("--url", receiver.url, "--url", down)
    assert bad.returncode == 1 and "1 of 2" in bad.stderr and down in bad.stderr
    assert len(receiver.messages) == 2
    config.write_text("", encoding="utf-8")
    none = run()
    assert none.returncode == 2 and "no alert URL" in none.stderr


@pytest.mark.parametrize(("station", "aet", "named"), [
    ("CT ROOM 2", "GATEWAY", " from CT ROOM 2 (AE GATEWAY)"), ("CT1", "CT1", " from CT1"),
    (None, "CT1", " from CT1"), ("CT ROOM 2", None, " from CT ROOM 2"), (None, None, ""),
])
def test_the_alert_names_the_scanner(station: str | None, aet: str | None, named: str) -> None:
    series = Series(series_description=None, calling_aet=aet, station_name=station)
    assert outbox._sender(series) == named
