"""Problems of the node itself, told to the PACS admin while they last.

``/metrics`` says all of this to a Prometheus that alerts, but many departments run none and
learn that their PACS stopped taking reports when a radiologist misses them days later. So,
with ``[alerts].ops_urls`` set, a check runs every minute and, for each problem it finds,
adds alert rows for those URLs (sent, retried and recorded like the technologist's alerts),
at most one message per problem and key every ``ops_repeat_h`` hours while it lasts:

- ``delivery_failing`` (key: the destination's name): reports to one destination still not
  delivered ``ops_delivery_wait_min`` after they were made, or given up in the last day;
- ``storage_low`` (key: the storage folder): less than ``ops_storage_free_mb`` free on its
  file system, before C-STORE starts being refused at ``[storage].min_free_mb``;
- ``queue_stalled`` (key: ``queue``): a queued series has waited ``ops_queue_wait_min`` for a
  worker (stuck, stopped, or too slow for the load).

A problem that goes away simply stops repeating; no "resolved" message is sent.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from node.alerts.outbox import PENDING
from node.cluster.membership import JOBS_LOCK_CLASS, PROBLEMS_KEY
from node.config import Settings
from node.queue.models import Alert, OutboxEntry, Series, utcnow
from node.queue.states import DeliveryState, SeriesState

log = logging.getLogger(__name__)

_MB = 1024 * 1024
#: Given-up deliveries older than this no longer count: an admin who lets them be is not
#: reminded for ever.
GIVEN_UP_WINDOW = timedelta(days=1)


@dataclass(frozen=True)
class Problem:
    """One problem as its alert tells it: ``title`` for a subject line, ``text`` for a chat
    message, ``facts`` for the JSON and the mail's body."""

    event: str
    key: str
    title: str
    text: str
    facts: dict[str, Any] = field(default_factory=dict)


def delivery_problems(session: Session, settings: Settings, now: datetime) -> list[Problem]:
    """One problem per destination with reports overdue or given up."""
    overdue = now - timedelta(minutes=settings.alerts.ops_delivery_wait_min)
    rows = session.execute(
        select(OutboxEntry.destination, OutboxEntry.ae_title, OutboxEntry.host,
               OutboxEntry.port, OutboxEntry.state, func.count(OutboxEntry.id))
        .where(or_(and_(OutboxEntry.state == DeliveryState.PENDING,
                        OutboxEntry.created_at < overdue),
                   and_(OutboxEntry.state == DeliveryState.FAILED,
                        OutboxEntry.created_at >= now - GIVEN_UP_WINDOW)))
        .group_by(OutboxEntry.destination, OutboxEntry.ae_title, OutboxEntry.host,
                  OutboxEntry.port, OutboxEntry.state)).all()
    found: dict[str, dict[str, Any]] = {}
    for name, aet, host, port, state, n in rows:
        entry = found.setdefault(name, {"destination": name, "peer": f"{aet}@{host}:{port}",
                                        "overdue": 0, "given_up": 0})
        entry["overdue" if state == DeliveryState.PENDING else "given_up"] += n
    problems = []
    for name, facts in sorted(found.items()):
        facts["last_error"] = session.scalar(
            select(OutboxEntry.last_error)
            .where(OutboxEntry.destination == name, OutboxEntry.last_error.is_not(None),
                   OutboxEntry.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]))
            .order_by(OutboxEntry.next_attempt_at.desc()).limit(1))
        counts = []
        if facts["overdue"]:
            counts.append(f"{facts['overdue']} not delivered after "
                          f"{settings.alerts.ops_delivery_wait_min:g} min")
        if facts["given_up"]:
            counts.append(f"{facts['given_up']} given up in the last 24 h")
        title = f"reports are not reaching {name}"
        text = (f"vaenode {settings.dicom.ae_title}: {title} ({facts['peer']}): "
                + ", ".join(counts)
                + (f"; last error: {facts['last_error']}" if facts["last_error"] else "")
                + f". Check it with `vaenode echo {facts['peer']}`; given-up reports go again "
                  "with `vaenode queue resend SERIES_UID` (the dashboard's Deliveries page "
                  "lists them).")
        problems.append(Problem("delivery_failing", name, title, text, facts))
    return problems


def storage_problem(settings: Settings) -> Problem | None:
    """A problem when the storage's file system has less than ``ops_storage_free_mb`` free."""
    folder = settings.storage.dir
    try:
        free_mb = shutil.disk_usage(folder).free // _MB
    except OSError as exc:
        log.warning("cannot measure free space of %s: %s", folder, exc)
        return None
    if free_mb >= settings.alerts.ops_storage_free_mb:
        return None
    title = "storage is running out"
    text = (f"vaenode {settings.dicom.ae_title}: {title}: {free_mb} MiB free on {folder} "
            f"(warning below {settings.alerts.ops_storage_free_mb} MiB; scanners' images are "
            f"refused below {settings.storage.min_free_mb} MiB). Free space, or keep images "
            f"fewer days ([storage].retention_days, now {settings.storage.retention_days}).")
    return Problem("storage_low", str(folder), title, text,
                   {"storage": str(folder), "free_mb": free_mb,
                    "min_free_mb": settings.storage.min_free_mb})


def queue_problem(session: Session, settings: Settings, now: datetime) -> Problem | None:
    """A problem when the longest-waiting queued series has waited ``ops_queue_wait_min``."""
    since, queued = session.execute(
        select(func.min(Series.updated_at), func.count(Series.id))
        .where(Series.status == SeriesState.QUEUED)).one()
    if since is None:
        return None
    waited_min = (now - since).total_seconds() / 60.0
    if waited_min < settings.alerts.ops_queue_wait_min:
        return None
    title = "series are waiting for a worker"
    text = (f"vaenode {settings.dicom.ae_title}: {title}: the oldest of {queued} queued series "
            f"has waited {waited_min:.0f} min (warning at "
            f"{settings.alerts.ops_queue_wait_min:g} min). Is the worker running "
            "([worker].enabled, the log), stuck on a series (`vaenode queue list --status "
            "processing`), or too slow for the load?")
    return Problem("queue_stalled", "queue", title, text,
                   {"queued": queued, "waited_min": round(waited_min, 1)})


def raise_problems(session_factory: sessionmaker[Session], settings: Settings,
                   problems: list[Problem], now: datetime) -> int:
    """Add one row per ``ops_urls`` entry for each problem not told within ``ops_repeat_h``;
    returns how many problems were told."""
    if not problems or not settings.alerts.ops_urls:
        return 0
    told = 0
    repeat_after = now - timedelta(hours=settings.alerts.ops_repeat_h)
    with session_factory.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            # One node runs this check (node/cluster/membership.py); should two overlap for a
            # moment (a holder cut off that has not noticed yet), the second waits here and
            # then sees the first one's rows: a problem is still told once.
            session.execute(text("SELECT pg_advisory_xact_lock(:c, :k)"),
                            {"c": JOBS_LOCK_CLASS, "k": PROBLEMS_KEY})
        for problem in problems:
            recent = session.scalar(
                select(Alert.id).where(Alert.event == problem.event,
                                       Alert.problem_key == problem.key[:255],
                                       Alert.created_at >= repeat_after).limit(1))
            if recent is not None:
                continue
            payload = json.dumps({"event": problem.event, "title": problem.title,
                                  "text": problem.text, "node": settings.dicom.ae_title,
                                  **problem.facts,
                                  "raised_at": now.isoformat(timespec="seconds")})
            session.add_all([Alert(series_id=None, url=url, payload=payload, state=PENDING,
                                   attempts=0, next_attempt_at=now, created_at=now,
                                   event=problem.event, problem_key=problem.key[:255])
                             for url in settings.alerts.ops_urls])
            told += 1
            log.warning("node problem: %s", problem.title,
                        extra={"event": problem.event, "problem_key": problem.key})
    return told


def check(session_factory: sessionmaker[Session], settings: Settings,
          now: datetime | None = None) -> int:
    """Look for every problem once and tell the new ones; returns how many were told."""
    now = now or utcnow()
    with session_factory() as session:
        problems = delivery_problems(session, settings, now)
        stalled = queue_problem(session, settings, now)
    low = storage_problem(settings)
    problems += [p for p in (low, stalled) if p is not None]
    return raise_problems(session_factory, settings, problems, now)
