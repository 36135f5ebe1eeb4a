"""A real SMTP server on loopback (aiosmtpd) that records the mails the node hands it.

It speaks real SMTP on a real socket: STARTTLS or implicit TLS with a self-signed
certificate for 127.0.0.1 made by ``openssl``, AUTH LOGIN/PLAIN with one account, and it
refuses recipients at ``refused.example.org`` with 550, as a relay refuses an unknown user.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import ssl
import subprocess
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.helpers.orthanc import free_port

REFUSED_DOMAIN = "refused.example.org"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid one day; the certificate is its own CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "smtp.crt", folder / "smtp.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class _Recorder:
    def __init__(self, server: MailServer) -> None:
        self.server = server

    # aiosmtpd calls its hooks by these names.
    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,  # noqa: N802
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower().endswith("@" + REFUSED_DOMAIN):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(mail, EmailMessage)
        self.server.mails.append((envelope.mail_from, list(envelope.rcpt_tos), mail))
        # STARTTLS sets session.ssl; implicit TLS is the transport's own.
        self.server.tls_used.append(session.ssl is not None or
                                    server.transport.get_extra_info("ssl_object") is not None)
        self.server.logins.append(getattr(session, "auth_data", None))
        return "250 Message accepted"


class MailServer:
    """``security``: "none", "starttls" (required before MAIL) or "tls" (implicit). With
    ``account`` (user, password), AUTH is required. ``mails`` holds (sender, recipients,
    message)."""

    def __init__(self, folder: Path, security: str = "none",
                 account: tuple[str, str] | None = None) -> None:
        self.mails: list[tuple[str, list[str], EmailMessage]] = []
        self.tls_used: list[bool] = []
        self.logins: list[Any] = []
        self.port = free_port()
        self.cert: Path | None = None
        kwargs: dict[str, Any] = {}
        context = None
        if security != "none":
            self.cert, key = self_signed(folder)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert, key)
        if security == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        if account is not None:
            user, password = account

            def check(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
                ok = (isinstance(auth_data, LoginPassword)
                      and auth_data.login.decode() == user
                      and auth_data.password.decode() == password)
                return AuthResult(success=ok, handled=False, auth_data=auth_data)

            kwargs.update(authenticator=check, auth_required=True,
                          auth_require_tls=security != "none")
        self.controller = Controller(
            _Recorder(self), hostname="127.0.0.1", port=self.port,
            ssl_context=context if security == "tls" else None, **kwargs)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
