"""The delivery job of ``vaenode serve``: send due outbox rows, record each attempt.

Runs every ``[delivery].poll_interval_s`` seconds, and at once when the worker has scored a
series (``node.service.WAKES``); one run at a time (a run that finds another under way returns).
Each row is claimed, sent and recorded on its own, so one unreachable PACS delays only its own
rows.
"""

from __future__ import annotations

import logging
import threading

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings, TlsSettings
from node.errors import DeliveryError
from node.queue.models import utcnow
from node.report import outbox
from node.report.push import Target, Timeouts, send_file

log = logging.getLogger(__name__)

JOB_ID = "report.deliver"
#: Rows looked at per run; the rest wait for the next run (a few seconds later).
BATCH = 50


def _tls_for(settings: Settings, destination: str) -> TlsSettings | None:
    # TLS material is configuration, not data: looked up by destination name at send time.
    for d in settings.delivery.destinations:
        if d.name == destination:
            return d.tls
    return None


def _timeouts(settings: Settings) -> Timeouts:
    return Timeouts(
        acse_s=settings.dicom.acse_timeout_s,
        dimse_s=settings.dicom.dimse_timeout_s,
        network_s=settings.dicom.network_timeout_s,
    )


def lease_s(settings: Settings) -> float:
    """How long a claimed row is ours: longer than one C-STORE can take with these timeouts."""
    t = _timeouts(settings)
    return t.acse_s + 2 * t.dimse_s + 30.0


def deliver_due(session_factory: sessionmaker[Session], settings: Settings) -> int:
    """Try every due outbox row once.

    Returns:
        How many rows were delivered in this run.
    """
    with session_factory() as session:
        ids = outbox.due_ids(session, utcnow(), BATCH)
    delivered = 0
    for row_id in ids:
        claimed = outbox.claim(session_factory, row_id, lease_s(settings))
        if claimed is None:
            continue
        target = Target(
            ae_title=claimed.ae_title,
            host=claimed.host,
            port=claimed.port,
            tls=_tls_for(settings, claimed.destination),
        )
        try:
            send_file(
                settings.storage.dir / claimed.report_path,
                target,
                calling_ae_title=settings.dicom.ae_title,
                timeouts=_timeouts(settings),
            )
        except DeliveryError as exc:
            outbox.mark_attempt_failed(session_factory, claimed, str(exc), settings.delivery)
        except Exception as exc:  # the job's boundary: record it, keep the job alive
            log.exception(
                "unexpected error delivering a report",
                extra={"sop_instance_uid": claimed.sop_instance_uid, "peer": str(target)},
            )
            outbox.mark_attempt_failed(
                session_factory, claimed, f"{type(exc).__name__}: {exc}", settings.delivery
            )
        else:
            outbox.mark_sent(session_factory, claimed)
            delivered += 1
    return delivered


def install(
    scheduler: BaseScheduler, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Add the delivery job to the service's scheduler."""
    running = threading.Lock()

    def tick() -> int:
        # A run woken while another delivers (node.service.WAKES) returns at once, instead of
        # APScheduler warning "maximum number of running instances" (hence two instances).
        if not running.acquire(blocking=False):
            return 0
        try:
            return deliver_due(session_factory, settings)
        finally:
            running.release()

    scheduler.add_job(
        tick,
        "interval",
        seconds=settings.delivery.poll_interval_s,
        id=JOB_ID,
        max_instances=2,
        coalesce=True,
        replace_existing=True,
        next_run_time=utcnow(),
    )
