"""The outbox as the dashboard shows it: each report, each destination, attempts, last error.

The per-series view and re-delivery are the outbox's own functions (``node/report/outbox.py``),
so that ``vaenode queue show/resend`` and the dashboard cannot disagree; this module adds the
all-series outbox page and the failure count for ``/metrics``.
"""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from node.errors import AdminActionError
from node.queue.models import OutboxEntry
from node.queue.states import DeliveryState
from node.report import outbox as report_outbox

OUTBOX_PAGE_LIMIT = 500


def outbox_rows(
    session: Session, limit: int = OUTBOX_PAGE_LIMIT
) -> list[report_outbox.DeliveryRow]:
    """The newest outbox rows of every series."""
    return report_outbox.recent_deliveries(session, limit)


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
