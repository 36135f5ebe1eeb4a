"""Queue transitions: the only code that changes a series' status.

One function per transition. Each runs in a transaction: the caller's, when the session is
already in one (so a worker can store its results and mark the series done atomically), or its
own otherwise. Each checks its precondition in the UPDATE itself (``WHERE status = ...``), so
concurrent workers and ingest threads cannot both win, and each writes a ``series_events`` row.
A transition whose precondition no longer holds raises :class:`~node.errors.QueueConflict`.

Lease model: :func:`claim_next_queued` moves a series to ``processing`` with ``attempts + 1``,
the claiming ``worker_id`` and ``lease_until``. A worker that dies leaves an expired lease;
:func:`requeue_expired_leases` puts such series back in ``queued``, or marks them ``failed``
with reason ``abandoned`` once ``attempts`` reached the maximum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from node.errors import QueueConflict
from node.queue.models import (
    Association,
    Instance,
    Series,
    SeriesEvent,
    UTCDateTime,
    utcnow,
)
from node.queue.states import FINAL_STATES, SeriesState

log = logging.getLogger(__name__)

ACTOR_INGEST = "ingest"
ACTOR_SCHEDULER = "scheduler"


@contextmanager
def _transaction(session: Session) -> Iterator[None]:
    """Join the caller's transaction, or run in a new one that commits on success."""
    if session.in_transaction():
        yield
    else:
        with session.begin():
            yield


def _event(
    session: Session | Connection,
    series_id: int,
    from_status: SeriesState | None,
    to_status: SeriesState,
    reason: str | None,
    actor: str,
    at: datetime,
) -> None:
    duration = _run_seconds(session, series_id, at) if to_status is SeriesState.DONE else None
    session.execute(
        insert(SeriesEvent).values(
            series_id=series_id,
            at=at,
            from_status=from_status.value if from_status else None,
            to_status=to_status.value,
            reason=reason,
            actor=actor,
            duration_s=duration,
        )
    )


def _run_seconds(session: Session | Connection, series_id: int, at: datetime) -> float | None:
    """Seconds from the ``processing`` event that began the run a ``done`` at ``at`` ends; None
    when the series' latest run event is not such a start (no run open)."""
    latest = session.execute(
        select(SeriesEvent.to_status, SeriesEvent.at)
        .where(SeriesEvent.series_id == series_id,
               SeriesEvent.to_status.in_([SeriesState.PROCESSING.value, SeriesState.DONE.value]))
        .order_by(SeriesEvent.id.desc())
        .limit(1)
    ).first()
    if latest is None or latest[0] != SeriesState.PROCESSING.value:
        return None
    return max(0.0, (at - latest[1]).total_seconds())


def _transition(
    session: Session,
    series_id: int,
    to_status: SeriesState,
    *,
    allowed_from: Iterable[SeriesState],
    reason: str | None,
    actor: str,
    worker_id: str | None = None,
    extra_where: Iterable[ColumnElement[bool]] = (),
    values: dict[str, object] | None = None,
) -> Series:
    """Move one series to ``to_status`` if it is in one of ``allowed_from`` (and, when
    ``worker_id`` is given, still held by that worker); record the event; return the row."""
    allowed = [SeriesState(s) for s in allowed_from]
    now = utcnow()
    with _transaction(session):
        current = session.execute(
            select(Series.status).where(Series.id == series_id)
        ).scalar_one_or_none()
        if current is None:
            raise QueueConflict(f"series id {series_id} does not exist")
        stmt = (
            update(Series)
            .where(Series.id == series_id, Series.status.in_(allowed), *extra_where)
            .values(status=to_status, status_reason=reason, updated_at=now, **(values or {}))
            .execution_options(synchronize_session=False)
        )
        if worker_id is not None:
            stmt = stmt.where(Series.worker_id == worker_id)
        if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
            raise QueueConflict(
                f"series id {series_id} cannot go to {to_status.value}: it is {current.value}"
                + (f" or not held by {worker_id}" if worker_id else "")
            )
        _event(session, series_id, SeriesState(current), to_status, reason, actor, now)
        series = session.get(Series, series_id, populate_existing=True)
        assert series is not None
    log.info(
        "series %s -> %s",
        series.series_instance_uid,
        to_status.value,
        extra={"series_uid": series.series_instance_uid, "reason": reason, "actor": actor},
    )
    return series


# --- ingest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRecord:
    """What ingest knows about one stored instance, as plain values."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    instance_number: int | None
    modality: str | None
    series_description: str | None
    body_part: str | None
    calling_aet: str | None
    peer_address: str | None
    received_at: datetime
    #: The scanner, from the instance's header (set on the series by its first instance).
    station_name: str | None = None
    manufacturer: str | None = None
    scanner_model: str | None = None


@dataclass(frozen=True)
class RecordResult:
    """Outcome of :func:`record_instance`."""

    series_id: int
    new_instance: bool
    #: A file the instance used to live at (it moved series); the caller deletes it after commit.
    stale_path: str | None


# Statements of the per-instance path, built once: SQLAlchemy then reuses their compiled form,
# where statements built with .values(...) on each call cost about 1 ms of CPU per instance.
_SELECT_SERIES = select(Series.id, Series.status).where(
    Series.series_instance_uid == bindparam("b_uid")
)
_SELECT_SERIES_LOCKED = _SELECT_SERIES.with_for_update()
_INSERT_SERIES = insert(Series).returning(Series.id)
_INSERT_EVENT = insert(SeriesEvent)
_SELECT_INSTANCE = select(Instance.id, Instance.series_id, Instance.path).where(
    Instance.sop_instance_uid == bindparam("b_uid")
)
_INSERT_INSTANCE = insert(Instance)
_UPDATE_INSTANCE = (
    update(Instance)
    .where(Instance.id == bindparam("b_id"))
    .values(
        series_id=bindparam("b_series_id", type_=Integer),
        sop_class_uid=bindparam("b_sop_class_uid", type_=String),
        transfer_syntax_uid=bindparam("b_transfer_syntax_uid", type_=String),
        path=bindparam("b_path", type_=String),
        size_bytes=bindparam("b_size_bytes", type_=BigInteger),
        instance_number=bindparam("b_instance_number", type_=Integer),
        received_at=bindparam("b_received_at", type_=UTCDateTime()),
    )
)
_UPDATE_SERIES_SEEN = (
    update(Series)
    .where(Series.id == bindparam("b_id"))
    .values(
        instance_count=Series.instance_count + bindparam("b_delta", type_=Integer),
        last_received_at=bindparam("b_now", type_=UTCDateTime()),
        updated_at=bindparam("b_now2", type_=UTCDateTime()),
        calling_aet=bindparam("b_aet", type_=String),
        peer_address=bindparam("b_peer", type_=String),
    )
)


class _DriverSql:
    """The statements of :func:`record_instance`'s common case as driver SQL for one dialect.

    Even with statements built once, SQLAlchemy spends about 0.04 ms of CPU per execution
    (cache key, parameter processing, result set-up): 0.20 ms per instance for the four
    statements of an instance of a series that is receiving, against 0.09 ms through the
    DBAPI cursor of the same connection and transaction (microbenchmark, SQLite). So that
    case runs on the cursor; everything else (new series, a series reopened, an instance that
    moved series) keeps the SQLAlchemy statements below. Values go through the column types'
    own bind processors and DBAPI errors are wrapped as SQLAlchemy's (an ``IntegrityError``
    stays one), so rows and exceptions are those of the SQLAlchemy path.
    """

    def __init__(self, dialect: Any) -> None:
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self.select_series = (f"SELECT id, status FROM series WHERE series_instance_uid = {mark}"
                              + _row_lock(dialect))
        self.select_instance = (
            f"SELECT id, series_id, path FROM instances WHERE sop_instance_uid = {mark}")
        self.insert_instance = (
            "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, "
            "transfer_syntax_uid, path, size_bytes, instance_number, received_at) "
            f"VALUES ({', '.join([mark] * 8)})")
        self.update_instance = (
            f"UPDATE instances SET sop_class_uid = {mark}, transfer_syntax_uid = {mark}, "
            f"path = {mark}, size_bytes = {mark}, instance_number = {mark}, "
            f"received_at = {mark} WHERE id = {mark}")
        self.update_series_seen = (
            f"UPDATE series SET instance_count = instance_count + {mark}, "
            f"last_received_at = {mark}, updated_at = {mark}, calling_aet = {mark}, "
            f"peer_address = {mark} WHERE id = {mark}")
        time_type = UTCDateTime().dialect_impl(dialect)
        self.time = time_type.bind_processor(dialect) or (lambda value: value)
        self.error: type[Exception] = dialect.loaded_dbapi.Error

    @staticmethod
    def for_dialect(dialect: Any) -> _DriverSql | None:
        """The statements for ``dialect``, or None when its parameter style is not handled."""
        if dialect.paramstyle not in ("qmark", "format", "pyformat"):
            return None
        key = (dialect.name, dialect.driver, dialect.paramstyle)
        found = _DRIVER_SQL.get(key)
        if found is None:
            found = _DRIVER_SQL[key] = _DriverSql(dialect)
        return found


_DRIVER_SQL: dict[tuple[str, str, str], _DriverSql] = {}


def _row_lock(dialect: Any) -> str:
    """`` FOR UPDATE`` where the database has row locks (not SQLite: one writer at a time).

    Ingest reads the series' status and then adds the instance; the completion job (on another
    node, or another thread) may queue the series in between. Locking the series row when it
    is read makes the two take turns: the completion's conditional UPDATE waits for ingest's
    commit and then finds the series no longer idle, or ingest waits for the completion's and
    then reopens the series it finds queued. Without the lock an instance could join a
    series that was already queued, and be left out of its verdict.
    """
    return "" if dialect.name == "sqlite" else " FOR UPDATE"


def _record_receiving(conn: Connection, sql: _DriverSql,
                      rec: InstanceRecord) -> RecordResult | None:
    """:func:`record_instance` for an instance of a series that is ``receiving`` and that it is
    new to or already part of; None (having changed nothing) in every other case."""
    cursor = conn.connection.cursor()
    statement: str = ""
    params: tuple[Any, ...] = ()
    try:
        statement, params = sql.select_series, (rec.series_instance_uid,)
        cursor.execute(statement, params)
        series = cursor.fetchone()
        if series is None or series[1] != SeriesState.RECEIVING.value:
            return None
        series_id = series[0]
        statement, params = sql.select_instance, (rec.sop_instance_uid,)
        cursor.execute(statement, params)
        existing = cursor.fetchone()
        if existing is not None and existing[1] != series_id:
            return None
        now = sql.time(rec.received_at)
        if existing is None:
            statement, params = sql.insert_instance, (
                series_id, rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax_uid,
                rec.path, rec.size_bytes, rec.instance_number, now)
        else:
            statement, params = sql.update_instance, (
                rec.sop_class_uid, rec.transfer_syntax_uid, rec.path, rec.size_bytes,
                rec.instance_number, now, existing[0])
        cursor.execute(statement, params)
        statement, params = sql.update_series_seen, (
            1 if existing is None else 0, now, now, rec.calling_aet, rec.peer_address, series_id)
        cursor.execute(statement, params)
    except sql.error as exc:
        raise DBAPIError.instance(statement, params, exc, sql.error) from exc
    finally:
        cursor.close()
    stale_path = existing[2] if existing is not None and existing[2] != rec.path else None
    return RecordResult(series_id=series_id, new_instance=existing is None,
                        stale_path=stale_path)


def record_instance(session: Session, rec: InstanceRecord) -> RecordResult:
    """Upsert the series and instance rows for one stored instance, in one transaction.

    A new series starts ``receiving``; a series in any other state goes back to ``receiving``
    (a new instance means the earlier verdict, or the scoring under way, no longer covers the
    whole series). A duplicate SOP instance keeps one row, updated in place.
    """
    now = rec.received_at
    with _transaction(session):
        # Core statements on the session's connection: this runs once per received instance.
        conn = session.connection()
        sql = _DriverSql.for_dialect(conn.dialect)
        if sql is not None and (done := _record_receiving(conn, sql, rec)) is not None:
            return done
        select_series = _SELECT_SERIES
        if conn.dialect.name != "sqlite":
            select_series = _SELECT_SERIES_LOCKED  # see _row_lock()
        row = conn.execute(select_series, {"b_uid": rec.series_instance_uid}).first()
        if row is None:
            series_id = conn.execute(_INSERT_SERIES, {
                "study_instance_uid": rec.study_instance_uid,
                "series_instance_uid": rec.series_instance_uid,
                "modality": rec.modality,
                "series_description": rec.series_description,
                "body_part": rec.body_part,
                "station_name": rec.station_name,
                "manufacturer": rec.manufacturer,
                "scanner_model": rec.scanner_model,
                "instance_count": 0,
                "first_received_at": now,
                "last_received_at": now,
                "updated_at": now,
                "calling_aet": rec.calling_aet,
                "peer_address": rec.peer_address,
                "status": SeriesState.RECEIVING,
                "attempts": 0,
            }).scalar_one()
            conn.execute(_INSERT_EVENT, {
                "series_id": series_id, "at": now, "from_status": None,
                "to_status": SeriesState.RECEIVING.value, "reason": "first instance",
                "actor": ACTOR_INGEST,
            })
        else:
            series_id, status = row.id, SeriesState(row.status)
            if status is not SeriesState.RECEIVING:
                reason = f"new instance while {status.value}"
                conn.execute(
                    update(Series)
                    .where(Series.id == series_id)
                    .values(status=SeriesState.RECEIVING, status_reason=reason,
                            lease_until=None, worker_id=None)
                )
                _event(conn, series_id, status, SeriesState.RECEIVING, reason,
                       ACTOR_INGEST, now)
                log.info(
                    "series %s reopened",
                    rec.series_instance_uid,
                    extra={"series_uid": rec.series_instance_uid, "was": status.value},
                )

        existing = conn.execute(_SELECT_INSTANCE, {"b_uid": rec.sop_instance_uid}).first()
        stale_path = None
        count_delta = 0
        if existing is None:
            conn.execute(_INSERT_INSTANCE, {
                "series_id": series_id,
                "sop_instance_uid": rec.sop_instance_uid,
                "sop_class_uid": rec.sop_class_uid,
                "transfer_syntax_uid": rec.transfer_syntax_uid,
                "path": rec.path,
                "size_bytes": rec.size_bytes,
                "instance_number": rec.instance_number,
                "received_at": now,
            })
            count_delta = 1
        else:
            conn.execute(_UPDATE_INSTANCE, {
                "b_id": existing.id,
                "b_series_id": series_id,
                "b_sop_class_uid": rec.sop_class_uid,
                "b_transfer_syntax_uid": rec.transfer_syntax_uid,
                "b_path": rec.path,
                "b_size_bytes": rec.size_bytes,
                "b_instance_number": rec.instance_number,
                "b_received_at": now,
            })
            if existing.series_id != series_id:
                count_delta = 1
                conn.execute(
                    update(Series)
                    .where(Series.id == existing.series_id)
                    .values(instance_count=Series.instance_count - 1, updated_at=now)
                )
            if existing.path != rec.path:
                stale_path = existing.path
        conn.execute(_UPDATE_SERIES_SEEN, {
            "b_id": series_id, "b_delta": count_delta, "b_now": now, "b_now2": now,
            "b_aet": rec.calling_aet, "b_peer": rec.peer_address,
        })
    return RecordResult(series_id=series_id, new_instance=existing is None, stale_path=stale_path)


def receiving_instances(session: Session) -> list[tuple[int, str]]:
    """(instance id, path) of every instance of a ``receiving`` series: the only rows a crash
    can have committed without their file's name being durable yet (see ingest/store.py)."""
    with _transaction(session):
        rows = session.execute(
            select(Instance.id, Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.status == SeriesState.RECEIVING)
        ).all()
    return [(r.id, r.path) for r in rows]


def drop_instances(session: Session, instance_ids: list[int]) -> None:
    """Delete instance rows (their files are gone) and correct their series' counts."""
    if not instance_ids:
        return
    with _transaction(session):
        for instance_id in instance_ids:
            series_id = session.execute(
                select(Instance.series_id).where(Instance.id == instance_id)
            ).scalar_one_or_none()
            if series_id is None:
                continue
            session.execute(
                delete(Instance).where(Instance.id == instance_id)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(Series).where(Series.id == series_id)
                .values(instance_count=Series.instance_count - 1, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )


# --- scheduler and worker transitions --------------------------------------------------------


def idle_series_ids(session: Session, idle_before: datetime) -> list[int]:
    """Ids of ``receiving`` series whose last instance arrived before ``idle_before``."""
    return _receiving_ids(session, Series.last_received_at <= idle_before)


def released_series_ids(session: Session, settled_before: datetime, min_instances: int
                        ) -> list[int]:
    """Ids of ``receiving`` series whose sender released its association normally after
    storing at least ``min_instances`` of their instances, with nothing received since that
    release and the last instance received before ``settled_before``, and that hold as many
    instances as their instances declared (Images in Acquisition), when they declared any."""
    return _receiving_ids(
        session,
        Series.released_at.is_not(None),
        Series.released_at >= Series.last_received_at,
        Series.released_instances >= min_instances,
        Series.last_received_at <= settled_before,
        or_(Series.expected_instances.is_(None),
            Series.instance_count >= Series.expected_instances),
    )


def _receiving_ids(session: Session, *conditions: ColumnElement[bool]) -> list[int]:
    """Ids of ``receiving`` series meeting ``conditions``, the longest waiting first."""
    with _transaction(session):
        return list(
            session.execute(
                select(Series.id)
                .where(Series.status == SeriesState.RECEIVING, *conditions)
                .order_by(Series.last_received_at)
            ).scalars()
        )


def mark_queued(
    session: Session,
    series_id: int,
    *,
    idle_before: datetime,
    reason: str = "no new instance for the idle time",
    actor: str = ACTOR_SCHEDULER,
) -> Series:
    """``receiving`` -> ``queued``, only if still idle (no instance since ``idle_before``)."""
    return _transition(
        session,
        series_id,
        SeriesState.QUEUED,
        allowed_from=[SeriesState.RECEIVING],
        reason=reason,
        actor=actor,
        extra_where=[Series.last_received_at <= idle_before],
    )


def has_images(session: Session, series_id: int) -> bool:
    """Whether the series still has stored instances (the retention job may have removed
    them: :func:`purge_images`)."""
    return bool(session.scalar(select(exists().where(Instance.series_id == series_id))))


def requeue(session: Session, series_id: int, *, reason: str, actor: str) -> Series:
    """``done``/``skipped``/``failed`` -> ``queued`` with attempts reset: score it again.

    Raises:
        QueueConflict: not in a final state, or its images are gone (retention).
    """
    with _transaction(session):
        if not has_images(session, series_id):
            purged = session.scalar(select(Series.purged_at).where(Series.id == series_id))
            raise QueueConflict(
                f"series id {series_id} has no stored images to score"
                + (f" (removed by the retention policy at {purged:%Y-%m-%d %H:%M} UTC)"
                   if purged is not None else ""))
    return _transition(
        session,
        series_id,
        SeriesState.QUEUED,
        allowed_from=FINAL_STATES,
        reason=reason,
        actor=actor,
        values={"attempts": 0, "lease_until": None, "worker_id": None},
    )


def claim_next_queued(session: Session, worker_id: str, lease_s: float) -> Series | None:
    """Atomically take the oldest ``queued`` series for ``worker_id``; None when none is queued.

    The UPDATE re-checks ``status = 'queued'``: when another worker took the candidate first
    (possible on PostgreSQL; SQLite serializes writers with BEGIN IMMEDIATE) the next one is
    tried. On PostgreSQL the candidate is also locked with SKIP LOCKED.
    """
    now = utcnow()
    with _transaction(session):
        for _ in range(16):
            candidate = session.execute(
                select(Series.id, Series.series_instance_uid)
                .where(Series.status == SeriesState.QUEUED)
                .order_by(Series.last_received_at, Series.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            try:
                return _transition(
                    session,
                    candidate.id,
                    SeriesState.PROCESSING,
                    allowed_from=[SeriesState.QUEUED],
                    reason=f"claimed by {worker_id}",
                    actor=worker_id,
                    values={
                        "worker_id": worker_id,
                        "lease_until": now + timedelta(seconds=lease_s),
                        "attempts": Series.attempts + 1,
                    },
                )
            except QueueConflict:
                continue
    return None


def mark_processing(session: Session, series_id: int, worker_id: str, lease_s: float) -> Series:
    """``queued`` -> ``processing`` for one given series (claim a specific series)."""
    return _transition(
        session,
        series_id,
        SeriesState.PROCESSING,
        allowed_from=[SeriesState.QUEUED],
        reason=f"claimed by {worker_id}",
        actor=worker_id,
        values={
            "worker_id": worker_id,
            "lease_until": utcnow() + timedelta(seconds=lease_s),
            "attempts": Series.attempts + 1,
        },
    )


def renew_lease(session: Session, series_id: int, worker_id: str, lease_s: float) -> None:
    """Extend the lease of a series ``worker_id`` is still processing (long scoring runs)."""
    with _transaction(session):
        result = session.execute(
            update(Series)
            .where(
                Series.id == series_id,
                Series.status == SeriesState.PROCESSING,
                Series.worker_id == worker_id,
            )
            .values(lease_until=utcnow() + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise QueueConflict(f"series id {series_id} is no longer held by {worker_id}")


def _finish(
    session: Session,
    series_id: int,
    to_status: SeriesState,
    reason: str | None,
    worker_id: str | None,
    actor: str | None,
) -> Series:
    return _transition(
        session,
        series_id,
        to_status,
        allowed_from=[SeriesState.PROCESSING],
        reason=reason,
        actor=actor or worker_id or "worker",
        worker_id=worker_id,
        values={"lease_until": None},
    )


def mark_done(
    session: Session,
    series_id: int,
    reason: str | None = None,
    *,
    worker_id: str | None = None,
    actor: str | None = None,
) -> Series:
    """``processing`` -> ``done`` (scored). With ``worker_id``, only if that worker holds it."""
    return _finish(session, series_id, SeriesState.DONE, reason, worker_id, actor)


def fill_series_columns(session: Session, series_id: int, values: dict[str, str]) -> None:
    """Set columns of the series row that it lacks (the scanner's ``station_name``,
    ``manufacturer``, ``scanner_model``; ``modality``, ``body_part``, ``series_description``)
    from its headers as the worker or the backfill read them: a series stored before revision
    0011_series_scanner, or whose first instance did not name them (a broken sender may leave
    Modality out of some images). A value already there stays; each is cut to its column."""
    columns = Series.__table__.c
    with _transaction(session):
        session.execute(update(Series).where(Series.id == series_id).values(
            {column: func.coalesce(getattr(Series, column),
                                   value[:getattr(columns[column].type, "length", None)])
             for column, value in values.items()}))


def mark_skipped(
    session: Session,
    series_id: int,
    reason: str,
    *,
    worker_id: str | None = None,
    actor: str | None = None,
) -> Series:
    """``processing`` -> ``skipped`` (no model applies); ``reason`` says why."""
    return _finish(session, series_id, SeriesState.SKIPPED, reason, worker_id, actor)


def mark_failed(
    session: Session,
    series_id: int,
    reason: str,
    *,
    worker_id: str | None = None,
    actor: str | None = None,
) -> Series:
    """``processing`` -> ``failed``; ``reason`` is what a person reads in the queue."""
    return _finish(session, series_id, SeriesState.FAILED, reason, worker_id, actor)


def requeue_expired_leases(
    session: Session, max_attempts: int, now: datetime | None = None
) -> list[Series]:
    """Series whose lease expired go back to ``queued``, or to ``failed`` ("abandoned") when
    they already had ``max_attempts`` attempts. Returns the series that changed."""
    now = now or utcnow()
    changed = []
    with _transaction(session):
        # Every worker of a deployment runs this: rows another one is taking back right now
        # are skipped (PostgreSQL; SQLite has one writer at a time).
        rows = session.execute(
            select(Series.id, Series.attempts).where(
                Series.status == SeriesState.PROCESSING, Series.lease_until < now
            ).with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            gone = row.attempts >= max_attempts
            try:
                changed.append(
                    _transition(
                        session,
                        row.id,
                        SeriesState.FAILED if gone else SeriesState.QUEUED,
                        allowed_from=[SeriesState.PROCESSING],
                        reason="abandoned" if gone else "lease expired",
                        actor=ACTOR_SCHEDULER,
                        extra_where=[Series.lease_until < now],
                        values={"lease_until": None, "worker_id": None},
                    )
                )
            except QueueConflict as exc:  # renewed or finished since it was read
                log.debug("lease not taken back: %s", exc)
    return changed


def requeue_processing_at_startup(session: Session, worker_id: str | None = None) -> list[Series]:
    """At start-up, series left ``processing`` (by this ``worker_id``, or by anyone when None)
    go back to ``queued``: the process that held them is gone."""
    changed = []
    with _transaction(session):
        query = select(Series.id).where(Series.status == SeriesState.PROCESSING)
        if worker_id is not None:
            query = query.where(Series.worker_id == worker_id)
        for series_id in session.execute(query).scalars().all():
            changed.append(
                _transition(
                    session,
                    series_id,
                    SeriesState.QUEUED,
                    allowed_from=[SeriesState.PROCESSING],
                    reason="worker restarted",
                    actor=ACTOR_SCHEDULER,
                    values={"lease_until": None, "worker_id": None},
                )
            )
    return changed


# --- associations ----------------------------------------------------------------------------


def open_association(
    session: Session, *, calling_aet: str, called_aet: str, peer_address: str
) -> int:
    """Record an accepted association; returns its id."""
    with _transaction(session):
        return session.execute(
            insert(Association)
            .values(
                calling_aet=calling_aet,
                called_aet=called_aet,
                peer_address=peer_address,
                started_at=utcnow(),
                result="open",
            )
            .returning(Association.id)
        ).scalar_one()


def close_association(
    session: Session, association_id: int, *, result: str, instances: int, failed: int
) -> None:
    """Record how an association ended and what it carried."""
    with _transaction(session):
        session.execute(
            update(Association)
            .where(Association.id == association_id)
            .values(ended_at=utcnow(), result=result, instance_count=instances,
                    failed_count=failed)
            .execution_options(synchronize_session=False)
        )


def record_release(session: Session, stored: dict[str, int], at: datetime,
                   declared: dict[str, int] | None = None) -> None:
    """An association released normally after storing ``stored`` (instances per Series
    Instance UID): noted on each series (``released_at``, ``released_instances``) for the
    queue's completion rule (:func:`released_series_ids`), with the largest image count its
    instances declared (``declared``, Images in Acquisition; ``expected_instances`` keeps the
    largest seen over all associations)."""
    declared = declared or {}
    with _transaction(session):
        for series_uid, count in stored.items():
            values: dict[str, Any] = {"released_at": at, "released_instances": count}
            if series_uid in declared:
                n = declared[series_uid]
                values["expected_instances"] = case(
                    (or_(Series.expected_instances.is_(None), Series.expected_instances < n), n),
                    else_=Series.expected_instances)
            session.execute(
                update(Series)
                .where(Series.series_instance_uid == series_uid)
                .values(**values)
                .execution_options(synchronize_session=False)
            )


def record_rejected_association(
    session: Session, *, calling_aet: str, called_aet: str, peer_address: str, reason: str
) -> None:
    """Record an association refused at negotiation (access control, limits)."""
    now = utcnow()
    with _transaction(session):
        session.execute(
            insert(Association).values(
                calling_aet=calling_aet[:16],
                called_aet=called_aet[:16],
                peer_address=peer_address,
                started_at=now,
                ended_at=now,
                result=f"rejected: {reason}"[:128],
            )
        )


# --- retention ------------------------------------------------------------------------------


def _expired(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [Series.status.in_(list(FINAL_STATES)), Series.updated_at < cutoff,
            Series.last_received_at < cutoff]


def expired_series_ids(session: Session, cutoff: datetime, limit: int) -> list[int]:
    """Ids of series finished (done, skipped, failed) and quiet since before ``cutoff`` that
    still have stored images, the oldest first."""
    with _transaction(session):
        return list(session.scalars(
            select(Series.id)
            .where(*_expired(cutoff), exists().where(Instance.series_id == Series.id))
            .order_by(Series.last_received_at, Series.id)
            .limit(limit)))


def purge_images(session: Session, series_id: int, cutoff: datetime, reason: str) -> list[str]:
    """Delete the instance rows of an expired series (still finished and quiet since before
    ``cutoff``, checked under the row lock), note ``purged_at`` and an event; returns the
    instance files (relative paths) for the caller to delete after the commit.

    Raises:
        QueueConflict: the series is no longer expired (an instance arrived, a re-score).
    """
    now = utcnow()
    with _transaction(session):
        status = session.scalar(
            select(Series.status).where(Series.id == series_id, *_expired(cutoff))
            .with_for_update())
        if status is None:
            raise QueueConflict(f"series id {series_id} is no longer expired")
        rows = session.execute(
            select(Instance.id, Instance.path).where(Instance.series_id == series_id)).all()
        session.execute(delete(Instance).where(Instance.id.in_([r.id for r in rows]))
                        .execution_options(synchronize_session=False))
        session.execute(update(Series).where(Series.id == series_id)
                        .values(instance_count=0, purged_at=now,
                                purged_instances=func.coalesce(Series.purged_instances, 0)
                                + len(rows))
                        .execution_options(synchronize_session=False))
        _event(session, series_id, SeriesState(status), SeriesState(status), reason,
               ACTOR_SCHEDULER, now)
    return [r.path for r in rows]


def purged_series_since(session: Session, since: datetime) -> list[tuple[int, str, str]]:
    """(id, study UID, series UID) of the series whose images were deleted since ``since``."""
    with _transaction(session):
        rows = session.execute(
            select(Series.id, Series.study_instance_uid, Series.series_instance_uid)
            .where(Series.purged_at.is_not(None), Series.purged_at >= since)
            .order_by(Series.id)).all()
    return [(r[0], r[1], r[2]) for r in rows]


def instance_paths(session: Session, series_id: int) -> set[str]:
    """The stored files (relative paths) the rows of one series point to."""
    with _transaction(session):
        return set(session.scalars(select(Instance.path).where(Instance.series_id == series_id)))


def received_instances(session: Session) -> int:
    """SOP instances received and stored since the database began (a re-sent duplicate
    once), including those whose rows the retention job removed."""
    with _transaction(session):
        stored = session.scalar(select(func.count(Instance.id))) or 0
        purged = session.scalar(select(func.coalesce(func.sum(Series.purged_instances), 0)))
    return int(stored) + int(purged or 0)
