"""Wake a job on the other nodes when work is handed on (PostgreSQL ``LISTEN``/``NOTIFY``).

On one node a job that handed work on wakes the job that takes it (``node.service.WAKES``):
the worker starts as soon as a series is queued, delivery as soon as it is scored. In a
deployment those jobs run in other processes: the completion job on the node holding the
cluster-wide jobs, the worker elsewhere, delivery back on the first. Without a wake each
hand-over waits for the next poll of the taker (``[worker].poll_interval_s``,
``[delivery].poll_interval_s``). So the node that handed on also sends ``NOTIFY vaenode_wake``
with the job's id, and every node listens on a session of its own and runs that job now if it
has it. A lost notification costs one poll interval, never a series: the polls stay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from node.cluster.membership import sessions_engine

log = logging.getLogger(__name__)

CHANNEL = "vaenode_wake"
#: Seconds between checks of the stop flag while no notification comes, and before a lost
#: listening session is opened again.
_IDLE_S = 1.0
_RETRY_S = 5.0


def notify(session_factory: sessionmaker[Session], node_name: str,
           job_ids: Iterable[str]) -> None:
    """Ask every other node to run ``job_ids`` now (delivered when this transaction commits)."""
    with session_factory.begin() as session:
        for job_id in job_ids:
            session.execute(text("SELECT pg_notify(:channel, :payload)"),
                            {"channel": CHANNEL, "payload": f"{job_id}|{node_name}"})


class WakeListener:
    """A thread that listens on its own session and runs a woken job of ``scheduler`` now.

    Only with the psycopg driver (its ``notifies()``); other drivers keep the polls alone.
    """

    def __init__(self, database_url: str, node_name: str, scheduler: BaseScheduler) -> None:
        self._url = database_url
        self._node_name = node_name
        self._scheduler = scheduler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="cluster-wake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (within about a second)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * _IDLE_S + 1)

    def _wake(self, payload: str) -> None:
        job_id, _, sender = payload.partition("|")
        if sender == self._node_name:
            return  # this node woke its own jobs already
        job = self._scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def _run(self) -> None:
        engine = sessions_engine(self._url)
        if engine.dialect.driver != "psycopg":
            log.info("cross-node wakes need the psycopg driver; the jobs poll instead")
            engine.dispose()
            return
        try:
            while not self._stop.is_set():
                try:
                    self._listen(engine)
                except Exception as exc:  # the session dropped: listen again after a pause
                    log.warning("wake listener: %s; listening again in %g s", exc, _RETRY_S)
                    self._stop.wait(_RETRY_S)
        finally:
            engine.dispose()

    def _listen(self, engine: object) -> None:
        raw = engine.raw_connection()  # type: ignore[attr-defined]
        try:
            conn = raw.driver_connection
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
            while not self._stop.is_set():
                for note in conn.notifies(timeout=_IDLE_S):
                    self._wake(note.payload)
        finally:
            raw.close()
