"""What the dashboard pages show, read from the queue database as plain values.

Routes stay thin: each page asks one function here for frozen dataclasses and hands them to a
template. Keeping SQL out of the routes and templates lets the tests check a page's facts
without HTML, and keeps lazy-loading surprises out of Jinja.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.queue.models import Association, Series, SeriesEvent
from node.queue.states import SeriesState

QUEUE_PAGE_LIMIT = 500
STATES = tuple(SeriesState.__members__[name] for name in
               ("RECEIVING", "QUEUED", "PROCESSING", "DONE", "SKIPPED", "FAILED"))


@dataclass(frozen=True)
class QueueFilter:
    """The queue page's filters; None or empty means "any"."""

    status: str | None = None
    modality: str | None = None
    calling_aet: str | None = None
    station: str | None = None
    date_from: date | None = None
    date_to: date | None = None


@dataclass(frozen=True)
class SeriesRow:
    """One line of the queue table."""

    series_instance_uid: str
    study_instance_uid: str
    status: str
    status_reason: str | None
    modality: str | None
    series_description: str | None
    body_part: str | None
    calling_aet: str | None
    station_name: str | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    attempts: int


@dataclass(frozen=True)
class EventRow:
    """One status change in a series' history."""

    at: datetime
    from_status: str | None
    to_status: str
    reason: str | None
    actor: str


@dataclass(frozen=True)
class AssociationRow:
    """One line of the associations page."""

    calling_aet: str | None
    called_aet: str | None
    peer_address: str | None
    started_at: datetime
    ended_at: datetime | None
    instance_count: int
    failed_count: int
    result: str


def _row(s: Series) -> SeriesRow:
    return SeriesRow(
        series_instance_uid=s.series_instance_uid,
        study_instance_uid=s.study_instance_uid,
        status=str(s.status),
        status_reason=s.status_reason,
        modality=s.modality,
        series_description=s.series_description,
        body_part=s.body_part,
        calling_aet=s.calling_aet,
        station_name=s.station_name,
        instance_count=s.instance_count,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
        attempts=s.attempts,
    )


def _day_start(d: date) -> datetime:
    return datetime.combine(d, time.min, tzinfo=UTC)


def list_series(
    session: Session, flt: QueueFilter, limit: int = QUEUE_PAGE_LIMIT
) -> list[SeriesRow]:
    """Series matching the filter, newest (last instance received) first.

    Dates are UTC calendar days of the last instance received, both ends included.
    """
    stmt = select(Series)
    if flt.status:
        stmt = stmt.where(Series.status == SeriesState(flt.status))
    if flt.modality:
        stmt = stmt.where(Series.modality == flt.modality)
    if flt.calling_aet:
        stmt = stmt.where(Series.calling_aet == flt.calling_aet)
    if flt.station:
        # Case-insensitive as routing rules and `calibrate --from-queue` are: a scanner
        # console's bookmarked URL is typed by hand.
        stmt = stmt.where(func.upper(Series.station_name) == flt.station.strip().upper())
    if flt.date_from:
        stmt = stmt.where(Series.last_received_at >= _day_start(flt.date_from))
    if flt.date_to:
        stmt = stmt.where(Series.last_received_at < _day_start(flt.date_to + timedelta(days=1)))
    stmt = stmt.order_by(Series.last_received_at.desc(), Series.id.desc()).limit(limit)
    return [_row(s) for s in session.scalars(stmt)]


def status_counts(session: Session) -> dict[str, int]:
    """Number of series in each state, every state present (zero when none)."""
    counts = {str(state): 0 for state in STATES}
    for status, n in session.execute(select(Series.status, func.count()).group_by(Series.status)):
        counts[str(status)] = int(n)
    return counts


def filter_choices(session: Session) -> tuple[list[str], list[str], list[str]]:
    """The modalities, calling AE titles and Station Names present, for the filter
    drop-downs."""
    modalities = session.scalars(
        select(Series.modality).where(Series.modality.is_not(None)).distinct().order_by(Series.modality)
    ).all()
    aets = session.scalars(
        select(Series.calling_aet)
        .where(Series.calling_aet.is_not(None))
        .distinct()
        .order_by(Series.calling_aet)
    ).all()
    stations = session.scalars(
        select(Series.station_name)
        .where(Series.station_name.is_not(None))
        .distinct()
        .order_by(Series.station_name)
    ).all()
    return [m for m in modalities if m], [a for a in aets if a], [s for s in stations if s]


def get_series(session: Session, series_uid: str) -> Series | None:
    """The ORM row of one series (None when unknown)."""
    return session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()


def series_row(session: Session, series_uid: str) -> SeriesRow | None:
    """The queue facts of one series (None when unknown)."""
    s = get_series(session, series_uid)
    return _row(s) if s is not None else None


def series_events(session: Session, series_id: int) -> list[EventRow]:
    """The status history of a series, oldest first."""
    stmt = select(SeriesEvent).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id)
    return [
        EventRow(at=e.at, from_status=e.from_status, to_status=e.to_status, reason=e.reason,
                 actor=e.actor)
        for e in session.scalars(stmt)
    ]


def list_associations(session: Session, limit: int = QUEUE_PAGE_LIMIT) -> list[AssociationRow]:
    """The most recent associations, newest first."""
    stmt = select(Association).order_by(Association.started_at.desc(), Association.id.desc())
    return [
        AssociationRow(
            calling_aet=a.calling_aet,
            called_aet=a.called_aet,
            peer_address=a.peer_address,
            started_at=a.started_at,
            ended_at=a.ended_at,
            instance_count=a.instance_count,
            failed_count=a.failed_count,
            result=a.result,
        )
        for a in session.scalars(stmt.limit(limit))
    ]
