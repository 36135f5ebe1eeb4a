"""Scheduled job of the queue: a series with no new instance for the idle time is complete.

DICOM has no "end of series" message; the node decides a series is complete when no instance
has arrived for ``[queue].series_idle_s`` seconds and hands it to the worker as ``queued``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.errors import QueueConflict
from node.queue import repo
from node.queue.models import utcnow

log = logging.getLogger(__name__)

JOB_ID = "queue.idle-series"


def queue_idle_series(session_factory: sessionmaker[Session], idle_s: float) -> int:
    """Move every ``receiving`` series idle for ``idle_s`` seconds to ``queued``.

    Each series moves in its own transaction, and only if it is still idle at that moment: an
    instance arriving between the scan and the update keeps its series ``receiving``.

    Returns:
        How many series were queued.
    """
    cutoff = utcnow() - timedelta(seconds=idle_s)
    with session_factory() as session:
        ids = repo.idle_series_ids(session, cutoff)
    queued = 0
    for series_id in ids:
        try:
            with session_factory.begin() as session:
                repo.mark_queued(session, series_id, idle_before=cutoff)
            queued += 1
        except QueueConflict as exc:
            log.debug("series not queued: %s", exc)
    return queued


def install(scheduler: BaseScheduler, settings: Settings, session_factory: sessionmaker[Session]
            ) -> None:
    """Add the idle-series job to the service's scheduler."""
    scheduler.add_job(
        queue_idle_series,
        "interval",
        seconds=settings.queue.check_interval_s,
        args=(session_factory, settings.queue.series_idle_s),
        id=JOB_ID,
        max_instances=1,
        coalesce=True,
        replace_existing=True,
    )
