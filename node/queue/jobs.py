"""Scheduled job of the queue: when a series is complete, hand it to the worker as ``queued``.

DICOM has no "end of series" message; the node takes a series as complete when either
- no instance has arrived for ``[queue].series_idle_s`` seconds (30 by default), or, with
  ``[queue].complete_on_release`` (the default),
- the sender released its association normally after storing at least
  ``release_min_instances`` of the series' instances, and nothing of the series has arrived
  for ``release_settle_s`` seconds since: a scanner that sends a series and releases has sent
  it, and the technologist sees the verdict seconds after the last image instead of half a
  minute. A sender that opens one association per image never triggers the rule (one
  instance each); one that sends a series in several associations one after the other is
  not cut short either (the next association's instances arrive within the settle time, after
  the release); one that pauses longer than the settle time between them waits for the rest
  when the series' instances declare their count (Images in Acquisition, (0020,1002): a
  released series holding fewer instances than the largest count declared is not complete),
  and otherwise gets the series scored after each part (a new instance reopens a scored
  series, and the new report supersedes the earlier one). A count that never arrives (a
  derived series copying its source's count) costs the idle time, no more.
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


def queue_idle_series(
    session_factory: sessionmaker[Session],
    idle_s: float,
    *,
    release_settle_s: float | None = None,
    release_min_instances: int = 2,
) -> int:
    """Move every complete ``receiving`` series to ``queued``: idle for ``idle_s`` seconds,
    or (``release_settle_s`` not None) released by its sender and settled (module docstring).

    Each series moves in its own transaction, and only if nothing arrived for it since the
    cutoff at that moment: an instance arriving between the scan and the update keeps its
    series ``receiving``.

    Returns:
        How many series were queued.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=idle_s)
    with session_factory() as session:
        due = [(series_id, cutoff, "no new instance for the idle time")
               for series_id in repo.idle_series_ids(session, cutoff)]
        if release_settle_s is not None:
            settled = now - timedelta(seconds=release_settle_s)
            idle = {series_id for series_id, _, _ in due}
            due += [(series_id, settled, "association released by the sender")
                    for series_id in repo.released_series_ids(session, settled,
                                                              release_min_instances)
                    if series_id not in idle]
    queued = 0
    for series_id, before, reason in due:
        try:
            with session_factory.begin() as session:
                repo.mark_queued(session, series_id, idle_before=before, reason=reason)
            queued += 1
        except QueueConflict as exc:
            log.debug("series not queued: %s", exc)
    return queued


def install(scheduler: BaseScheduler, settings: Settings, session_factory: sessionmaker[Session]
            ) -> None:
    """Add the complete-series job to the service's scheduler."""
    q = settings.queue
    scheduler.add_job(
        queue_idle_series,
        "interval",
        seconds=q.check_interval_s,
        args=(session_factory, q.series_idle_s),
        kwargs={"release_settle_s": q.release_settle_s if q.complete_on_release else None,
                "release_min_instances": q.release_min_instances},
        id=JOB_ID,
        max_instances=1,
        coalesce=True,
        replace_existing=True,
    )
