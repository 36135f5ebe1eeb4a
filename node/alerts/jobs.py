"""The alert job of ``vaenode serve``: send due alert messages (POST or mail), record each
attempt.

Runs every ``[alerts].poll_interval_s`` seconds and at once when the worker has scored a
series (``node.service.WAKES``); installed only when ``[alerts].urls`` or ``ops_urls`` names
any (with ``ops_urls``, :mod:`node.alerts.problems` also checks the node every
``ops_check_s``). One slow or unreachable URL costs its own timeout, not the others'
messages: each row is tried once per run and retried with backoff.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy.orm import Session, sessionmaker

from node.alerts import outbox, problems
from node.alerts.mail import send_mail
from node.alerts.outbox import shown
from node.config import AlertSettings, Settings
from node.queue.models import utcnow

log = logging.getLogger(__name__)

JOB_ID = "alerts.send"
PROBLEMS_JOB_ID = "alerts.problems"
#: Rows per run; the rest wait for the next run.
BATCH = 50


def post(url: str, payload: str, timeout_s: float,
         headers: Mapping[str, str] | None = None) -> None:
    """POST the JSON ``payload`` with the configured extra ``headers``; raises OSError
    (URLError, HTTPError) unless the answer is 2xx."""
    request = urllib.request.Request(
        url, data=payload.encode("utf-8"), method="POST",
        headers={**(headers or {}), "Content-Type": "application/json",
                 "User-Agent": "vaenode-alerts"})
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:  # http(s) only: config
        reply.read()


def deliver(url: str, payload: str, settings: AlertSettings) -> None:
    """Send one message to one alert URL: a POST for http(s), a mail through ``[alerts.smtp]``
    for mailto. Raises OSError or ValueError when it was not taken."""
    if not url.lower().startswith("mailto:"):
        post(url, payload, settings.timeout_s, settings.headers_for(url))
        return
    if settings.smtp is None:
        raise ValueError("a mailto: alert URL needs [alerts.smtp]")
    refused = send_mail(url, payload, settings.smtp, settings.timeout_s)
    if refused:
        log.warning("alert mail refused for %d recipient(s), taken for the others",
                    len(refused), extra={"url": shown(url), "refused": refused})


def send_due(session_factory: sessionmaker[Session], settings: AlertSettings) -> int:
    """Try every due alert once; returns how many were sent."""
    sent = 0
    for alert in outbox.due(session_factory, lease_s=settings.timeout_s + 30.0, limit=BATCH):
        try:
            deliver(alert.url, alert.payload, settings)
        except (OSError, ValueError) as exc:  # unreachable, refused, timeout, non-2xx
            state = outbox.mark(session_factory, alert, f"{type(exc).__name__}: {exc}",
                                settings)
            log.warning("alert not delivered (%s): %s", state, exc,
                        extra={"alert_id": alert.id, "url": shown(alert.url)})
        else:
            outbox.mark(session_factory, alert, None, settings)
            sent += 1
            log.info("alert sent", extra={"alert_id": alert.id, "url": shown(alert.url)})
    return sent


def install(scheduler: BaseScheduler, settings: Settings,
            session_factory: sessionmaker[Session]) -> None:
    """Add the alert job to the service's scheduler (none without alert URLs), and with
    ``[alerts].ops_urls`` the check for problems of the node itself."""
    if not (settings.alerts.urls or settings.alerts.ops_urls):
        return
    if settings.alerts.ops_urls:
        scheduler.add_job(problems.check, "interval", args=(session_factory, settings),
                          seconds=settings.alerts.ops_check_s, id=PROBLEMS_JOB_ID,
                          max_instances=1, coalesce=True, replace_existing=True)
    running = threading.Lock()

    def tick() -> int:
        if not running.acquire(blocking=False):  # woken while a run is under way
            return 0
        try:
            return send_due(session_factory, settings.alerts)
        finally:
            running.release()

    scheduler.add_job(tick, "interval", seconds=settings.alerts.poll_interval_s, id=JOB_ID,
                      max_instances=2, coalesce=True, replace_existing=True,
                      next_run_time=utcnow())
