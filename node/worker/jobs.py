"""The worker's scheduled job inside ``vaenode serve``: recover, claim, score, repeat.

At start-up, series left ``processing`` by this node (a crash, ``kill -9``, a power cut) go back
to ``queued``: with SQLite the database belongs to this one node, so every such series is ours;
with a shared database (PostgreSQL) only those held under this node's worker id (its
``[cluster].node_name``, which no other running process may hold) are, and other nodes' dead
work comes back through lease expiry. Each tick then requeues expired leases (``attempts + 1``,
or ``failed`` "abandoned" past ``[worker].max_attempts``) and scores queued series one after
another until none is left (or the tick's budget is spent).

While a series is scored, a :class:`LeaseKeeper` renews its lease every third of
``[worker].lease_s``: a live worker keeps a series however long it takes, and a dead one's
series comes back to the queue within ``lease_s`` (a deployment can set a short lease).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.errors import ModelError, QueueConflict
from node.queue import repo
from node.worker.routing import validate_rules
from node.worker.score import BundleCache, Outcome, process_series

log = logging.getLogger(__name__)

JOB_ID = "worker.score"
#: Most series one tick scores before it yields (shutdown stays responsive).
MAX_SERIES_PER_TICK = 20


def node_worker_id(settings: Settings) -> str:
    """This node's worker identity: its ``[cluster].node_name`` (the service fills in the
    default), else ``<host name>/<AE title>``; stable across restarts, so its own leftovers are
    found."""
    if settings.cluster.node_name is not None:
        return settings.cluster.node_name
    return f"{socket.gethostname()}/{settings.dicom.ae_title}"[:128]


class LeaseKeeper:
    """Renews the lease of one claimed series in a thread while the worker scores it.

    Stops when the series is no longer this worker's (reopened by a new instance, or taken
    back): the worker then finds out itself when it tries to mark it done.
    """

    def __init__(self, session_factory: sessionmaker[Session], series_id: int,
                 worker_id: str, lease_s: float) -> None:
        self._session_factory = session_factory
        self._series_id = series_id
        self._worker_id = worker_id
        self._lease_s = lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._lease_s / 3.0):
            try:
                with self._session_factory() as session:
                    repo.renew_lease(session, self._series_id, self._worker_id, self._lease_s)
            except QueueConflict:
                return
            except Exception as exc:  # the database had a moment: the next renewal may work
                log.warning("cannot renew the lease of series id %s: %s", self._series_id, exc)


class Worker:
    """One worker: its identity, its bundle cache, its settings and database."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        worker_id: str | None = None,
        bundles: BundleCache | None = None,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        # True once the node is stopping: a tick scores no further series (the one under way
        # finishes), so that a stop does not wait for a whole tick's worth of series.
        self._stopping = stopping or (lambda: False)
        self.session_factory = session_factory
        self.worker_id = worker_id or node_worker_id(settings)
        self.bundles = bundles or BundleCache()
        self._warm = False
        # Scoring a series outlasts the poll interval; a tick that finds another one running
        # returns at once instead of queueing behind it (see install()).
        self._running = threading.Lock()

    def recover_at_startup(self) -> int:
        """Put the series this node left ``processing`` back to ``queued``; returns how many."""
        shared = make_url(self.settings.database.url).get_backend_name() != "sqlite"
        with self.session_factory() as session:
            changed = repo.requeue_processing_at_startup(
                session, self.worker_id if shared else None
            )
        for series in changed:
            log.warning("series requeued at start-up (left processing)",
                        extra={"series_uid": series.series_instance_uid})
        return len(changed)

    def requeue_expired(self) -> int:
        """Requeue (or abandon) series whose lease ran out; returns how many changed."""
        with self.session_factory() as session:
            changed = repo.requeue_expired_leases(session, self.settings.worker.max_attempts)
        for series in changed:
            log.warning("lease expired: series %s", series.status.value,
                        extra={"series_uid": series.series_instance_uid,
                               "attempts": series.attempts})
        return len(changed)

    def warm_up(self) -> None:
        """Load every bundle the routing rules name, so the first series does not wait."""
        paths = {rule.model or self.settings.model.bundle for rule in self.settings.routing.rules}
        for path in paths:
            try:
                self.bundles.get(path)
            except ModelError as exc:
                # Not fatal: series routed to it fail with this reason, the others are scored.
                log.error("model bundle cannot be loaded: %s", exc)

    def run_once(self, max_series: int = MAX_SERIES_PER_TICK) -> list[Outcome]:
        """One tick: requeue expired leases, then score queued series until none is left.

        Returns at once (an empty list) when another tick of this worker is still running.
        """
        if not self._running.acquire(blocking=False):
            return []
        try:
            if not self._warm:
                self._warm = True
                self.warm_up()
            self.requeue_expired()
            outcomes: list[Outcome] = []
            while len(outcomes) < max_series and not self._stopping():
                outcome = self.process_next()
                if outcome is None:
                    break
                outcomes.append(outcome)
            return outcomes
        finally:
            self._running.release()

    def process_next(self) -> Outcome | None:
        """Claim the oldest queued series and score it under a kept lease; None when nothing
        is queued."""
        lease_s = self.settings.worker.lease_s
        with self.session_factory() as session:
            series = repo.claim_next_queued(session, self.worker_id, lease_s)
        if series is None:
            return None
        with LeaseKeeper(self.session_factory, series.id, self.worker_id, lease_s):
            return process_series(self.session_factory, self.settings, series, self.worker_id,
                                  self.bundles)

    def run_until_idle(self, timeout_s: float = 60.0) -> list[Outcome]:
        """Score until nothing is queued (for tests and ``vaenode queue retry --now``)."""
        deadline = time.monotonic() + timeout_s
        outcomes: list[Outcome] = []
        while time.monotonic() < deadline:
            batch = self.run_once()
            outcomes.extend(batch)
            if not batch:
                break
        return outcomes


def install(
    scheduler: BaseScheduler, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """Recover this node's unfinished work, then add the scoring job to the scheduler."""
    if not settings.worker.enabled:
        log.info("worker disabled ([worker].enabled = false)")
        return
    validate_rules(settings)
    worker = Worker(settings, session_factory,
                    stopping=lambda: scheduler.state == STATE_STOPPED)
    worker.recover_at_startup()
    scheduler.add_job(
        worker.run_once,
        "interval",
        seconds=settings.worker.poll_interval_s,
        id=JOB_ID,
        # Two: while one tick scores, the next finds the worker busy and returns at once,
        # instead of APScheduler warning "maximum number of running instances" every poll.
        max_instances=2,
        coalesce=True,
        replace_existing=True,
    )
    log.info("worker installed", extra={"worker_id": worker.worker_id})
