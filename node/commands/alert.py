"""``vaenode alert-test``: send a test message to each alert URL, to check ``[alerts]`` the way
``vaenode echo`` checks a PACS destination."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from node.commands.common import ConfigOption, setup
from node.errors import ConfigError, DeliveryError


def alert_test(
    config: ConfigOption = None,
    url: Annotated[list[str] | None, typer.Option(
        "--url", help="Send to this URL (http(s), or mailto: through [alerts.smtp]) instead "
        "of [alerts].urls and ops_urls (repeatable; the headers [alerts].headers gives a "
        "configured URL go with it).")] = None,
) -> None:
    """Send a test message (event "test") to every alert URL, urls and ops_urls (a POST, or a
    mail for mailto:); exit 1 when any fails."""
    from node.alerts.jobs import deliver
    from node.queue.models import utcnow

    settings = setup(config)
    urls = list(url or dict.fromkeys([*settings.alerts.urls, *settings.alerts.ops_urls]))
    if not urls:
        raise ConfigError("no alert URL: set [alerts].urls or ops_urls, or give --url")
    text = (f"vaenode: test message from the quality-gate node {settings.dicom.ae_title}; "
            "flagged series will be announced here.")
    payload = json.dumps({"event": "test", "text": text,
                          "sent_at": utcnow().isoformat(timespec="seconds")})
    failed = []
    for target in urls:
        try:
            deliver(target, payload, settings.alerts)
        except (OSError, ValueError) as exc:
            typer.echo(f"{target}: failed: {exc}", err=True)
            failed.append(target)
        else:
            typer.echo(f"{target}: delivered")
    if failed:
        raise DeliveryError(f"{len(failed)} of {len(urls)} alert URL(s) did not take the message")


def register(app: typer.Typer) -> None:
    """Add ``alert-test`` to the ``vaenode`` command."""
    app.command("alert-test")(alert_test)
