"""Alerts by email: a ``mailto:`` alert URL, sent through the hospital's mail relay.

Many departments have no chat webhook, but every one has a mail relay, a modality group's
mailbox, and often pagers or phones that take email. The message is the same JSON the
webhooks get, written as a plain-text mail: the ``text`` line first, then the other fields
one per line, never patient data. The relay's security is explicit (``starttls``, ``tls`` or
``none``): a certificate that does not verify fails the attempt, which is retried and
recorded like any other alert failure, rather than sending in clear.
"""

from __future__ import annotations

import json
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from node.alerts.outbox import describe
from node.config import SmtpSettings, mailto_addresses

#: Message fields that are not listed as facts under the text.
_NOT_FACTS = frozenset({"event", "title", "text"})


def subject(message: dict[str, Any]) -> str:
    """A subject one can act on from the mailbox list: for a flagged series what, how much,
    where; for a problem of the node, its title and the node."""
    node = message.get("node")
    return (f"[vaenode {node}]" if node else "[vaenode]") + f" {describe(message)}"


def compose(url: str, payload: str, sender: str) -> EmailMessage:
    """The mail for one alert row (``payload``: the JSON message of ``node.alerts.outbox``)."""
    message = json.loads(payload)
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = ", ".join(mailto_addresses(url))
    mail["Subject"] = subject(message)
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[-1])
    mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to the node
    mail["X-Vaenode-Event"] = str(message.get("event", ""))
    facts = [f"{key.replace('_', ' ')}: {value}" for key, value in message.items()
             if key not in _NOT_FACTS and value is not None]
    mail.set_content(str(message.get("text", "")) + "\n\n" + "\n".join(facts) + "\n")
    return mail


def send_mail(url: str, payload: str, smtp: SmtpSettings, timeout_s: float) -> list[str]:
    """Hand the alert to the relay; returns the recipients it refused while taking it for the
    others (sending again would repeat it to those).

    Raises:
        OSError: ``smtplib.SMTPException`` (every recipient refused included), ``ssl`` and
            socket errors.
    """
    mail = compose(url, payload, smtp.from_address)
    context = ssl.create_default_context(cafile=str(smtp.ca_file) if smtp.ca_file else None)
    client: smtplib.SMTP
    if smtp.security == "tls":
        client = smtplib.SMTP_SSL(smtp.host, smtp.effective_port, timeout=timeout_s,
                                  context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.effective_port, timeout=timeout_s)
    with client:
        if smtp.security == "starttls":
            client.starttls(context=context)
        if smtp.username is not None and smtp.password is not None:
            client.login(smtp.username, smtp.password)
        refused = client.send_message(mail)
    return sorted(refused)
