"""The delivery outbox: one row per report and destination, and its retry state.

The rows live in the queue database, so the schedule of retries survives restarts: after a crash
or a stop, delivery picks up where it was (same attempt count, same next attempt time).

Exactly-once, as PACS sees it: a row is claimed with a lease before its C-STORE, so two delivery
jobs (two nodes on one database) never send it at the same time; a node that dies after the
C-STORE and before recording it leaves an expired lease, and the report is sent again with the
same SOP Instance UID, which a PACS stores as the same instance, not a second one.

Backoff: after the n-th failed attempt the next one is due ``retry_base_s * 2**(n-1)`` seconds
later, capped at ``retry_max_s``; after ``max_attempts`` attempts the row is ``failed`` and
keeps the last error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import AlertSettings, DeliverySettings, Destination
from node.queue.models import OutboxEntry, Report, Series, utcnow
from node.queue.states import DeliveryState

log = logging.getLogger(__name__)


def backoff_s(attempts: int, settings: DeliverySettings | AlertSettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based; report deliveries
    and alerts alike)."""
    exponent = max(attempts - 1, 0)
    # Cap the exponent before it overflows a float for absurd attempt counts.
    return float(min(settings.retry_base_s * 2.0 ** min(exponent, 60), settings.retry_max_s))


def enqueue(session: Session, report: Report, destinations: list[Destination]) -> list[OutboxEntry]:
    """Add one pending row per destination for ``report`` in the caller's transaction."""
    rows = [
        OutboxEntry(
            report=report,
            destination=d.name,
            ae_title=d.ae_title,
            host=d.host,
            port=d.port,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
        )
        for d in destinations
    ]
    session.add_all(rows)
    return rows


@dataclass(frozen=True)
class Claimed:
    """A claimed outbox row, as plain values for the sender (no ORM object across threads)."""

    id: int
    report_path: str
    sop_instance_uid: str
    series_instance_uid: str
    destination: str
    ae_title: str
    host: str
    port: int
    attempts: int
    lease_until: datetime


def due_ids(session: Session, now: datetime, limit: int) -> list[int]:
    """Ids of pending rows whose next attempt is due and that nobody holds, oldest first."""
    stmt = (
        select(OutboxEntry.id)
        .where(
            OutboxEntry.state == DeliveryState.PENDING,
            OutboxEntry.next_attempt_at <= now,
            or_(OutboxEntry.lease_until.is_(None), OutboxEntry.lease_until < now),
        )
        .order_by(OutboxEntry.next_attempt_at, OutboxEntry.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def claim(session_factory: sessionmaker[Session], row_id: int, lease_s: float) -> Claimed | None:
    """Take the lease on one due row; None when another job took it first or it is not due."""
    now = utcnow()
    lease_until = now + timedelta(seconds=lease_s)
    with session_factory.begin() as session:
        result = session.execute(
            update(OutboxEntry)
            .where(
                OutboxEntry.id == row_id,
                OutboxEntry.state == DeliveryState.PENDING,
                OutboxEntry.next_attempt_at <= now,
                or_(OutboxEntry.lease_until.is_(None), OutboxEntry.lease_until < now),
            )
            .values(lease_until=lease_until)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        row = session.execute(
            select(OutboxEntry, Report, Series)
            .join(Report, OutboxEntry.report_id == Report.id)
            .join(Series, Report.series_id == Series.id)
            .where(OutboxEntry.id == row_id)
        ).one()
        entry, report, series = row
        return Claimed(
            id=entry.id,
            report_path=report.path,
            sop_instance_uid=report.sop_instance_uid,
            series_instance_uid=series.series_instance_uid,
            destination=entry.destination,
            ae_title=entry.ae_title,
            host=entry.host,
            port=entry.port,
            attempts=entry.attempts,
            lease_until=lease_until,
        )


def mark_sent(session_factory: sessionmaker[Session], claimed: Claimed) -> None:
    """Record a successful C-STORE (one attempt more, state ``sent``)."""
    now = utcnow()
    with session_factory.begin() as session:
        session.execute(
            update(OutboxEntry)
            .where(OutboxEntry.id == claimed.id)
            .values(
                state=DeliveryState.SENT,
                attempts=OutboxEntry.attempts + 1,
                sent_at=now,
                lease_until=None,
                last_error=None,
            )
        )
    log.info(
        "report delivered",
        extra={
            "series_instance_uid": claimed.series_instance_uid,
            "sop_instance_uid": claimed.sop_instance_uid,
            "destination": claimed.destination,
            "attempt": claimed.attempts + 1,
        },
    )


def mark_attempt_failed(
    session_factory: sessionmaker[Session],
    claimed: Claimed,
    error: str,
    settings: DeliverySettings,
) -> DeliveryState:
    """Record a failed attempt: retry later with backoff, or ``failed`` when attempts ran out.

    Returns:
        The row's new state (``pending`` or ``failed``).
    """
    attempts = claimed.attempts + 1
    now = utcnow()
    state = DeliveryState.FAILED if attempts >= settings.max_attempts else DeliveryState.PENDING
    next_at = now + timedelta(seconds=backoff_s(attempts, settings))
    with session_factory.begin() as session:
        session.execute(
            update(OutboxEntry)
            # A row withdrawn meanwhile (superseded) stays withdrawn: no retry.
            .where(OutboxEntry.id == claimed.id, OutboxEntry.state != DeliveryState.SUPERSEDED)
            .values(
                state=state,
                attempts=attempts,
                next_attempt_at=next_at,
                lease_until=None,
                last_error=error[:2000],
            )
        )
    extra = {
        "series_instance_uid": claimed.series_instance_uid,
        "sop_instance_uid": claimed.sop_instance_uid,
        "destination": claimed.destination,
        "attempt": attempts,
    }
    if state is DeliveryState.FAILED:
        log.error("report delivery failed for good: %s", error, extra=extra)
    else:
        log.warning(
            "report delivery failed, next attempt in %.1f s: %s",
            (next_at - now).total_seconds(),
            error,
            extra=extra,
        )
    return state


def delivered_destinations(session: Session, report_ids: list[int]) -> dict[int, set[str]]:
    """For each of ``report_ids`` that reached a destination, or is being sent to one right now
    (leased), the names of those destinations; reports that reached none are left out."""
    if not report_ids:
        return {}
    now = utcnow()
    rows = session.execute(
        select(OutboxEntry.report_id, OutboxEntry.destination).where(
            OutboxEntry.report_id.in_(report_ids),
            or_(OutboxEntry.state == DeliveryState.SENT,
                and_(OutboxEntry.state == DeliveryState.PENDING,
                     OutboxEntry.lease_until.is_not(None), OutboxEntry.lease_until > now)),
        )
    )
    out: dict[int, set[str]] = {}
    for report_id, destination in rows:
        out.setdefault(report_id, set()).add(destination)
    return out


def withdraw_superseded(session: Session, report_ids: list[int]) -> int:
    """Mark the still-pending deliveries of superseded reports ``superseded`` (never sent).

    A delivery leased by a sender right now is withdrawn as well; if its C-STORE succeeds,
    :func:`mark_sent` records ``sent`` over it, which is what happened. Returns the rows changed.
    """
    if not report_ids:
        return 0
    result = session.execute(
        update(OutboxEntry)
        .where(OutboxEntry.report_id.in_(report_ids),
               OutboxEntry.state == DeliveryState.PENDING)
        .values(state=DeliveryState.SUPERSEDED, lease_until=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def resend_series(session: Session, series_instance_uid: str) -> int:
    """Put the deliveries of a series' current (not superseded) reports back to ``pending``.

    Sent and failed rows alike start again with no attempts, due now. Runs in the caller's
    transaction.

    Returns:
        The number of outbox rows reset (0 when the series has no report).
    """
    report_ids = (
        select(Report.id)
        .join(Series, Report.series_id == Series.id)
        .where(Series.series_instance_uid == series_instance_uid, Report.superseded.is_(False))
    )
    result = session.execute(
        update(OutboxEntry)
        .where(OutboxEntry.report_id.in_(report_ids))
        .values(
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
            lease_until=None,
            sent_at=None,
            last_error=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DeliveryRow:
    """One delivery of one report, for ``vaenode queue show`` and the dashboard."""

    series_instance_uid: str
    series_description: str | None
    kind: str
    sop_instance_uid: str
    instance_number: int
    superseded: bool
    destination: str
    target: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None
    created_at: datetime


def _delivery_row(series: Series, report: Report, entry: OutboxEntry | None) -> DeliveryRow:
    """A report without an outbox row (no destination configured) still shows, as such."""
    return DeliveryRow(
        series_instance_uid=series.series_instance_uid,
        series_description=series.series_description,
        kind=report.kind,
        sop_instance_uid=report.sop_instance_uid,
        instance_number=report.instance_number,
        superseded=bool(report.superseded),
        destination=entry.destination if entry else "",
        target=f"{entry.ae_title}@{entry.host}:{entry.port}" if entry else "",
        state=str(entry.state) if entry else "no destination",
        attempts=entry.attempts if entry else 0,
        next_attempt_at=(
            entry.next_attempt_at if entry and entry.state is DeliveryState.PENDING else None
        ),
        sent_at=entry.sent_at if entry else None,
        last_error=entry.last_error if entry else None,
        created_at=entry.created_at if entry else report.created_at,
    )


def deliveries(session: Session, series_instance_uid: str) -> list[DeliveryRow]:
    """Every report of a series and its delivery state per destination, oldest first."""
    stmt = (
        select(Series, Report, OutboxEntry)
        .join(Report, Report.series_id == Series.id)
        .outerjoin(OutboxEntry, OutboxEntry.report_id == Report.id)
        .where(Series.series_instance_uid == series_instance_uid)
        .order_by(Report.id, OutboxEntry.id)
    )
    return [_delivery_row(*row) for row in session.execute(stmt)]


def recent_deliveries(session: Session, limit: int) -> list[DeliveryRow]:
    """The newest outbox rows of every series, newest first (the dashboard's outbox page)."""
    stmt = (
        select(Series, Report, OutboxEntry)
        .join(Report, OutboxEntry.report_id == Report.id)
        .join(Series, Report.series_id == Series.id)
        .order_by(OutboxEntry.created_at.desc(), OutboxEntry.id.desc())
        .limit(limit)
    )
    return [_delivery_row(*row) for row in session.execute(stmt)]
