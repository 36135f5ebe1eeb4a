"""The outbox as the dashboard shows it: each report, each destination, attempts, last error.

The per-series view and re-delivery are the outbox's own functions (``node/report/outbox.py``),
so that ``vaenode queue show/resend`` and the dashboard cannot disagree; this module adds the
all-series outbox page and the failure count for ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from node.errors import AdminActionError
from node.queue.models import OutboxEntry, Report, Series
from node.queue.states import DeliveryState
from node.report import outbox as report_outbox

OUTBOX_PAGE_LIMIT = 500


@dataclass(frozen=True)
class DeliveryRow:
    """One report to one destination."""

    series_instance_uid: str
    series_description: str | None
    kind: str
    sop_instance_uid: str
    superseded: bool
    destination: str
    target: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None
    created_at: datetime


def _rows(session: Session, where: list[ColumnElement[bool]], limit: int) -> list[DeliveryRow]:
    stmt = (
        select(OutboxEntry, Report, Series)
        .join(Report, OutboxEntry.report_id == Report.id)
        .join(Series, Report.series_id == Series.id)
        .where(*where)
        .order_by(OutboxEntry.created_at.desc(), OutboxEntry.id.desc())
        .limit(limit)
    )
    out = []
    for entry, report, series in session.execute(stmt):
        state = str(entry.state)
        out.append(
            DeliveryRow(
                series_instance_uid=series.series_instance_uid,
                series_description=series.series_description,
                kind=report.kind,
                sop_instance_uid=report.sop_instance_uid,
                superseded=bool(report.superseded),
                destination=entry.destination,
                target=f"{entry.ae_title}@{entry.host}:{entry.port}",
                state=state,
                attempts=entry.attempts,
                next_attempt_at=entry.next_attempt_at if state == "pending" else None,
                sent_at=entry.sent_at,
                last_error=entry.last_error,
                created_at=entry.created_at,
            )
        )
    return out


def outbox_rows(session: Session, limit: int = OUTBOX_PAGE_LIMIT) -> list[DeliveryRow]:
    """The newest outbox rows of every series."""
    return _rows(session, [], limit)


def for_series(session: Session, series_instance_uid: str) -> list[report_outbox.DeliveryRow]:
    """Every report of one series and where each stands with each destination."""
    return report_outbox.deliveries(session, series_instance_uid)


def resend(session: Session, series_instance_uid: str) -> int:
    """Put the series' current reports back in the outbox, in the caller's transaction.

    Raises:
        AdminActionError: the series has no current report with a destination.
    """
    reset = report_outbox.resend_series(session, series_instance_uid)
    if reset == 0:
        raise AdminActionError(f"series {series_instance_uid} has no report to re-deliver")
    return reset


def failed_attempts(session: Session) -> int:
    """C-STORE attempts that failed, over the whole outbox.

    The outbox keeps a count of attempts per row, not one row per attempt: a ``sent`` row
    failed all its attempts but the last; ``pending`` and ``failed`` rows failed every one.
    """
    failed = case(
        (OutboxEntry.state == DeliveryState.SENT, OutboxEntry.attempts - 1),
        else_=OutboxEntry.attempts,
    )
    return int(session.scalar(select(func.coalesce(func.sum(failed), 0))) or 0)


def state_counts(session: Session) -> dict[str, int]:
    """Outbox rows per delivery state, every state present."""
    counts = {str(s): 0 for s in DeliveryState}
    for state, n in session.execute(
        select(OutboxEntry.state, func.count()).group_by(OutboxEntry.state)
    ):
        counts[str(state)] = int(n)
    return counts
