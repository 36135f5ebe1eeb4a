"""The nodes view: every process of the deployment, as its own heartbeat tells it.

Each ``vaenode serve`` and ``vaenode worker`` writes its row of ``nodes`` at start, every
``[cluster].heartbeat_s`` and at a clean stop; nobody else writes it. A row whose heartbeat is
older than :data:`LOST_AFTER_BEATS` beats is shown ``lost`` (killed, its machine down, cut off
from the database): its series come back to the queue when their lease runs out, and another
node takes the cluster-wide jobs (node/cluster/membership.py). What a node holds now: the
series it is scoring (``series.worker_id`` is its name) and the cluster-wide jobs.

Leases and completion compare times written by different machines, so each heartbeat also
records the node's clock against the database server's (PostgreSQL); a node more than
:data:`CLOCK_WARN_S` off logs a warning (run NTP on every node: docs/cluster.md).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.cluster.membership import Membership
from node.queue.models import Node, Series, utcnow
from node.queue.states import SeriesState

log = logging.getLogger(__name__)

#: Missed heartbeats after which a node is shown ``lost``.
LOST_AFTER_BEATS = 3
#: A clock further off the database server's than this (seconds) is logged as a warning.
CLOCK_WARN_S = 2.0


class Heartbeat:
    """Writes this node's row: :meth:`start`, :meth:`beat` (scheduled), :meth:`stop`."""

    def __init__(self, session_factory: sessionmaker[Session], membership: Membership,
                 heartbeat_s: float) -> None:
        self._session_factory = session_factory
        self._membership = membership
        self._heartbeat_s = heartbeat_s
        self._started_at = utcnow()
        self._clock_warned = False

    def _row(self, now: datetime) -> dict[str, object]:
        return {"role": self._membership.role, "version": __version__[:32],
                "host": socket.gethostname()[:255], "pid": os.getpid(),
                "started_at": self._started_at, "heartbeat_at": now,
                "heartbeat_s": self._heartbeat_s, "stopped_at": None,
                "cluster_jobs": self._membership.cluster_jobs.is_set()}

    def start(self) -> None:
        """Write the row as a node that has just started (replacing an earlier run's)."""
        self.beat()

    def beat(self) -> None:
        """Record that this node is alive, whether it runs the cluster-wide jobs, and its clock
        offset; a row someone removed (``vaenode queue nodes --forget``) is written again."""
        name = self._membership.name
        with self._session_factory.begin() as session:
            offset = self._clock_offset(session)
            values = {**self._row(utcnow()), "clock_offset_s": offset}
            changed = session.execute(update(Node).where(Node.name == name).values(**values)
                                      .execution_options(synchronize_session=False))
            if changed.rowcount == 0:  # type: ignore[attr-defined]
                session.execute(insert(Node).values(name=name, **values))

    def stop(self) -> None:
        """Record a clean stop (the row stays, shown ``stopped``)."""
        now = utcnow()
        with self._session_factory.begin() as session:
            session.execute(update(Node).where(Node.name == self._membership.name)
                            .values(stopped_at=now, heartbeat_at=now, cluster_jobs=False)
                            .execution_options(synchronize_session=False))

    def _clock_offset(self, session: Session) -> float | None:
        if session.get_bind().dialect.name != "postgresql":
            return None  # one machine: nothing to compare with
        server = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        offset = round((utcnow() - server).total_seconds(), 3)
        off = abs(offset) > CLOCK_WARN_S
        if off and not self._clock_warned:
            log.warning("this node's clock is %.1f s off the database server's: leases and "
                        "series completion compare times of several machines (run NTP)",
                        offset, extra={"node": self._membership.name})
        self._clock_warned = off
        return offset


@dataclass(frozen=True)
class NodeView:
    """One node as the dashboard and ``vaenode queue nodes`` show it."""

    name: str
    role: str
    version: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    #: ``up``, ``stopped`` (a clean stop) or ``lost`` (no heartbeat for LOST_AFTER_BEATS beats)
    state: str
    cluster_jobs: bool
    clock_offset_s: float | None
    #: Series UIDs it is scoring now.
    scoring: tuple[str, ...] = field(default_factory=tuple)


def list_nodes(session: Session, now: datetime | None = None) -> list[NodeView]:
    """Every node that has run on this database, those up first, then by name."""
    now = now or utcnow()
    scoring: dict[str, list[str]] = {}
    for worker_id, uid in session.execute(
            select(Series.worker_id, Series.series_instance_uid)
            .where(Series.status == SeriesState.PROCESSING, Series.worker_id.is_not(None))
            .order_by(Series.series_instance_uid)):
        if worker_id is not None:  # excluded by the query; for the type checker
            scoring.setdefault(worker_id, []).append(uid)
    out = []
    for row in session.scalars(select(Node).order_by(Node.name)):
        age = max(0.0, (now - row.heartbeat_at).total_seconds())
        if row.stopped_at is not None:
            state = "stopped"
        elif age > LOST_AFTER_BEATS * row.heartbeat_s:
            state = "lost"
        else:
            state = "up"
        out.append(NodeView(
            name=row.name, role=row.role, version=row.version, host=row.host, pid=row.pid,
            started_at=row.started_at, heartbeat_at=row.heartbeat_at,
            heartbeat_age_s=round(age, 1), state=state,
            cluster_jobs=bool(row.cluster_jobs) and state == "up",
            clock_offset_s=row.clock_offset_s, scoring=tuple(scoring.get(row.name, ()))))
    out.sort(key=lambda n: (n.state != "up", n.name))
    return out


def forget(session: Session, name: str, now: datetime | None = None) -> bool:
    """Remove the row of a node that is stopped or lost (a node taken out of the deployment);
    False when there is no such row. A node that is up cannot be forgotten: its next
    heartbeat would write it again.

    Raises:
        ValueError: the node is up.
    """
    views = {n.name: n for n in list_nodes(session, now)}
    view = views.get(name)
    if view is None:
        return False
    if view.state == "up":
        raise ValueError(f"node {name!r} is up (heartbeat {view.heartbeat_age_s:g} s ago): "
                         "stop it first")
    session.execute(delete(Node).where(Node.name == name))
    return True
