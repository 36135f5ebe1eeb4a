"""Alerts by email: ``mailto:`` alert URLs handed to a real SMTP server on loopback (STARTTLS,
implicit TLS, login, refused recipients), retried like webhooks when the relay fails."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.alerts import jobs
from node.config import AlertSettings, SmtpSettings
from node.queue.models import Alert
from tests.helpers.alerts import scored_series
from tests.helpers.mail import REFUSED_DOMAIN, MailServer
from tests.helpers.orthanc import free_port

Factory = sessionmaker[Session]
TECHS = "mailto:mr-techs@hospital.example.org,qa.lead@hospital.example.org"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[MailServer]]:
    started: list[MailServer] = []
    yield started
    for server in started:
        server.close()


def _server(servers: list[MailServer], folder: Path, security: str,
            account: tuple[str, str] | None = None) -> MailServer:
    server = MailServer(folder, security, account)
    servers.append(server)
    return server


def _smtp(server: MailServer, **kw: Any) -> SmtpSettings:
    return SmtpSettings(host="127.0.0.1", port=server.port,
                        from_address="vaenode@hospital.example.org", **kw)


def _states(factory: Factory) -> list[tuple[str, int, str | None]]:
    with factory() as s:
        return [(a.state, a.attempts, a.last_error)
                for a in s.scalars(select(Alert).order_by(Alert.id))]


def test_a_flagged_series_is_mailed_over_starttls_with_a_login(
        factory: Factory, tmp_path: Path, servers: list[MailServer],
        caplog: pytest.LogCaptureFixture) -> None:
    relay = _server(servers, tmp_path / "pki", "starttls", account=("vaenode", "p4ss"))
    settings = AlertSettings(urls=[TECHS], dashboard_url="https://qc.example.org:8080",
                             smtp=_smtp(relay, security="starttls", username="vaenode",
                                        password="p4ss", ca_file=relay.cert))
    caplog.set_level(logging.INFO, logger="node.alerts.jobs")
    uid, added = scored_series(factory, tmp_path, {1, 2, 3, 4}, settings, station="MR ROOM 3")
    assert added == 1
    assert jobs.send_due(factory, settings) == 1
    assert jobs.send_due(factory, settings) == 0  # sent once
    [(sender, recipients, mail)] = relay.mails
    assert sender == "vaenode@hospital.example.org"
    assert recipients == ["mr-techs@hospital.example.org", "qa.lead@hospital.example.org"]
    assert relay.tls_used == [True] and relay.logins[0].login == b"vaenode"
    assert mail["Subject"] == ("[vaenode] series flagged: 4/6 images of 'Head routine' from "
                               "MR ROOM 3")
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["X-Vaenode-Event"] == "series_flagged"
    body = mail.get_content()
    assert body.startswith("vaenode: 4 of 6 images of 'Head routine' from MR ROOM 3 (AE CT1)")
    assert f"series instance uid: {uid}" in body and "station name: MR ROOM 3" in body
    assert f"dashboard url: https://qc.example.org:8080/series/{uid}" in body
    assert "Synthetic" not in mail.as_string()  # never the patient's name
    assert _states(factory) == [("sent", 1, None)]
    # Logs name the recipients' domain, not the mailboxes, and never the password.
    logged = [getattr(r, "url", None) for r in caplog.records if r.message == "alert sent"]
    assert logged == ["mailto:...@hospital.example.org"]
    assert "mr-techs" not in caplog.text and "p4ss" not in caplog.text


def test_a_relay_whose_certificate_does_not_verify_gets_nothing(
        factory: Factory, tmp_path: Path, servers: list[MailServer]) -> None:
    """Without the relay's CA the attempt fails (retried, recorded); nothing goes in clear."""
    relay = _server(servers, tmp_path / "pki", "starttls")
    settings = AlertSettings(urls=[TECHS], smtp=_smtp(relay), retry_base_s=60)
    scored_series(factory, tmp_path, {0, 1, 2}, settings)
    assert jobs.send_due(factory, settings) == 0
    [(state, attempts, error)] = _states(factory)
    assert (state, attempts) == ("pending", 1) and "CERTIFICATE_VERIFY_FAILED" in (error or "")
    assert relay.mails == []


def test_implicit_tls_and_a_partly_refusing_relay(
        factory: Factory, tmp_path: Path, servers: list[MailServer],
        caplog: pytest.LogCaptureFixture) -> None:
    relay = _server(servers, tmp_path / "pki", "tls")
    some = f"mailto:mr-techs@hospital.example.org,gone@{REFUSED_DOMAIN}"
    every = f"mailto:gone@{REFUSED_DOMAIN}"
    settings = AlertSettings(urls=[some, every], retry_base_s=60,
                             smtp=_smtp(relay, security="tls", ca_file=relay.cert))
    scored_series(factory, tmp_path, {0, 1, 2}, settings)
    caplog.set_level(logging.INFO, logger="node.alerts.jobs")
    assert jobs.send_due(factory, settings) == 1
    # Taken for one recipient: sent (a retry would mail that one again), the refusal logged.
    [(_, recipients, _)] = relay.mails
    assert recipients == ["mr-techs@hospital.example.org"] and relay.tls_used == [True]
    assert "refused for 1 recipient(s)" in caplog.text
    [first, second] = _states(factory)
    assert first == ("sent", 1, None)
    assert second[:2] == ("pending", 1) and "no such user" in (second[2] or "")


def test_a_relay_that_is_down_is_retried_then_given_up(factory: Factory, tmp_path: Path) -> None:
    smtp = SmtpSettings(host="127.0.0.1", port=free_port(), security="none",
                        from_address="vaenode@hospital.example.org")
    settings = AlertSettings(urls=[TECHS], smtp=smtp, max_attempts=1, timeout_s=2.0)
    scored_series(factory, tmp_path, {0, 1, 2}, settings)
    assert jobs.send_due(factory, settings) == 0
    [(state, attempts, error)] = _states(factory)
    assert (state, attempts) == ("failed", 1) and "ConnectionRefusedError" in (error or "")


def test_alert_test_command_mails(tmp_path: Path, servers: list[MailServer]) -> None:
    relay = _server(servers, tmp_path / "pki", "none")
    config = tmp_path / "node.toml"
    # The PACS admin's address for problems of the node is checked too.
    config.write_text(f'[alerts]\nops_urls = ["{TECHS}"]\n[alerts.smtp]\nhost = "127.0.0.1"\n'
                      f'port = {relay.port}\nsecurity = "none"\n'
                      'from_address = "vaenode@hospital.example.org"\n', encoding="utf-8")
    proc = subprocess.run([str(Path(sys.executable).with_name("vaenode")), "alert-test",
                           "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"{TECHS}: delivered" in proc.stdout, proc.stderr
    [(_, _, mail)] = relay.mails
    assert mail["Subject"] == "[vaenode] test" and "VAENODE" in mail.get_content()
    assert relay.tls_used == [False]


@pytest.mark.parametrize(("alerts", "error"), [
    ({"urls": [TECHS]}, r"need \[alerts.smtp\]"),
    ({"urls": ["mailto:not-an-address"]}, "is not a mail address"),
    ({"urls": ["mailto:a@b.org?subject=hi"]}, "not supported"),
    ({"urls": ["mailto:"]}, "names no address"),
    ({"urls": ["ftp://x"]}, "http://, https:// or mailto:"),
    ({"urls": [TECHS], "headers": {TECHS: {"X-A": "1"}},
      "smtp": {"host": "h", "from_address": "a@b.org"}}, "http\\(s\\) URLs only"),
    ({"smtp": {"host": "h", "from_address": "a@b.org", "security": "none",
               "username": "u", "password": "p"}}, "never sent in clear text"),
    ({"smtp": {"host": "h", "from_address": "a@b.org", "username": "u"}}, "go together"),
    ({"smtp": {"host": "h", "from_address": "nobody"}}, "is not a mail address"),
])
def test_bad_mail_settings_are_refused(alerts: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        AlertSettings.model_validate(alerts)


def test_mail_ports_follow_the_security() -> None:
    ports = {sec: SmtpSettings(host="h", from_address="a@b.org", security=sec).effective_port
             for sec in ("starttls", "tls", "none")}
    assert ports == {"starttls": 587, "tls": 465, "none": 25}
    assert jobs.shown("mailto:a@x.org,b@y.org,c@x.org") == "mailto:...@x.org,...@y.org"
    assert jobs.shown("mailto:not-an-address") == "mailto:..."  # a --url typed by hand
