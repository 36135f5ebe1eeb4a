"""The long-running node: migrate, listen, schedule the jobs, stop cleanly.

``vaenode serve`` builds a :class:`Service` from the settings and runs it until SIGTERM/SIGINT;
``vaenode worker`` builds one in the worker role (no DICOM port, no dashboard, the scoring job
only). Scheduled work comes from :data:`JOB_MODULES`: each module exposes
``install(scheduler, settings, session_factory) -> None``. An import error stops start-up: a
half-installed node would silently not score or not deliver. A job whose run handed work on
(series queued, series scored) wakes the job that takes it (:data:`WAKES`), instead of leaving
it to that job's next poll: up to a poll interval saved at each hand-over; on a shared
database the other nodes are woken too (node/cluster/wake.py).

Several nodes on one PostgreSQL database (docs/cluster.md): the jobs of
:data:`CLUSTER_JOB_IDS` run only while this node holds the cluster-wide jobs
(node/cluster/membership.py), so each runs on one node at a time; every node writes its
heartbeat to the nodes view (node/cluster/nodes.py).
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.cluster.membership import (
    ROLE_ALL,
    ROLE_RECEIVER,
    ROLE_WORKER,
    Membership,
    is_shared,
    with_node_name,
)
from node.cluster.nodes import Heartbeat
from node.cluster.storage_mark import check_shared_storage
from node.cluster.wake import WakeListener, notify
from node.config import Settings
from node.errors import ConfigError
from node.ingest.listeners import ListenerPool
from node.ingest.scp import Scp
from node.ingest.store import Store
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import upgrade

if TYPE_CHECKING:
    from node.admin.app import RunningDashboard

log = logging.getLogger(__name__)

#: Modules whose ``install(scheduler, settings, session_factory)`` adds scheduled jobs.
JOB_MODULES = ("node.queue.jobs", "node.worker.jobs", "node.report.jobs",
               "node.queue.retention", "node.alerts.jobs")

#: A run of the first module's job that returns something truthy (series queued, series
#: scored) runs the second module's job at once.
WAKES = (("node.queue.jobs", "node.worker.jobs"), ("node.worker.jobs", "node.report.jobs"),
         ("node.worker.jobs", "node.alerts.jobs"))

#: The only module of a ``vaenode worker``.
WORKER_MODULES = ("node.worker.jobs",)

#: Jobs that run on one node of a deployment at a time: the node holding the cluster-wide jobs.
CLUSTER_JOB_IDS = ("queue.idle-series", "storage.retention", "alerts.problems", "alerts.send",
                   "report.deliver")
MEMBERSHIP_JOB_ID = "cluster.takeover"
HEARTBEAT_JOB_ID = "cluster.heartbeat"

#: Longest wait for in-flight associations at shutdown, in seconds.
SHUTDOWN_GRACE_S = 60.0
#: On a shared storage folder, temporary files younger than this at start are left to the
#: sweep of a later start: another receiver may be writing them right now.
SHARED_SWEEP_MARGIN_S = 600.0


def install_jobs(
    scheduler: BackgroundScheduler,
    settings: Settings,
    session_factory: sessionmaker[Session],
    modules: tuple[str, ...] = JOB_MODULES,
    notify_others: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """Import each job module and let it add its jobs; returns the modules installed.

    ``notify_others``: on a shared database, wakes the taking jobs on the other nodes too
    (:func:`node.cluster.wake.notify`); their modules need not be installed here.
    """
    for name in modules:
        importlib.import_module(name).install(scheduler, settings, session_factory)
    wake_on_hand_over(scheduler, [(importlib.import_module(a).JOB_ID,
                                   importlib.import_module(b).JOB_ID)
                                  for a, b in WAKES if a in modules], notify_others)
    return list(modules)


def wake_on_hand_over(scheduler: BaseScheduler, pairs: list[tuple[str, str]],
                      notify_others: Callable[[list[str]], None] | None = None) -> None:
    """When a run of the first job of a pair returns something truthy, run the second now
    (if it is installed: a disabled worker has no job), and ask the other nodes to run it
    (``notify_others``). A job may wake several."""
    wakes: dict[str, list[str]] = {}
    for source, target in pairs:
        wakes.setdefault(source, []).append(target)

    def on_executed(event: JobExecutionEvent) -> None:
        if not event.retval:
            return
        targets = wakes.get(event.job_id, [])
        for target in targets:
            job = scheduler.get_job(target)
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))
        if targets and notify_others is not None:
            try:
                notify_others(targets)
            except Exception as exc:  # a lost wake costs a poll interval, not the job
                log.warning("cannot wake the other nodes: %s", exc)

    scheduler.add_listener(on_executed, EVENT_JOB_EXECUTED)


def run_on_one_node(scheduler: BaseScheduler, membership: Membership,
                    job_ids: tuple[str, ...] = CLUSTER_JOB_IDS) -> list[str]:
    """Make each installed job of ``job_ids`` a no-op while this node does not hold the
    cluster-wide jobs; returns the ids changed."""
    held = membership.cluster_jobs
    changed = []
    for job_id in job_ids:
        job = scheduler.get_job(job_id)
        if job is None:
            continue

        def on_one_node(*args: Any, _func: Callable[..., Any] = job.func, **kwargs: Any) -> Any:
            return _func(*args, **kwargs) if held.is_set() else None

        job.modify(func=on_one_node)
        changed.append(job_id)
    return changed


def role_of(settings: Settings, worker_command: bool) -> str:
    """The node's role: ``worker`` (``vaenode worker``), else ``all`` or ``receiver`` by
    ``[worker].enabled``.

    Raises:
        ConfigError: ``vaenode worker`` on SQLite, or with the worker disabled.
    """
    if not worker_command:
        return ROLE_ALL if settings.worker.enabled else ROLE_RECEIVER
    if not is_shared(settings.database.url):
        raise ConfigError(
            "vaenode worker shares the queue with other nodes, which SQLite cannot do: set "
            "[database].url to the deployment's PostgreSQL database (docs/cluster.md), or "
            "score inside `vaenode serve` ([worker].enabled = true)")
    if not settings.worker.enabled:
        raise ConfigError("vaenode worker with [worker].enabled = false has nothing to do")
    return ROLE_WORKER


class Service:
    """The parts of ``vaenode serve`` (or ``vaenode worker``: ``worker=True``), started and
    stopped in order."""

    def __init__(self, settings: Settings, *, worker: bool = False) -> None:
        self.role = role_of(settings, worker)
        self.settings = with_node_name(settings, self.role)
        self.membership: Membership | None = None
        self.heartbeat: Heartbeat | None = None
        self.wakes: WakeListener | None = None
        self.engine: Engine | None = None
        self.session_factory: sessionmaker[Session] | None = None
        self.scp: Scp | None = None
        self.store: Store | None = None
        self.listeners: ListenerPool | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.dashboard: RunningDashboard | None = None

    def start(self) -> tuple[str, int] | None:
        """Migrate, join the deployment, listen, start the scheduler; returns the listening
        address (None for a worker)."""
        s = self.settings
        serving = self.role != ROLE_WORKER
        if s.admin.enabled and serving:
            # Imported only when enabled: the web stack is heavy and optional.
            from node.admin.auth import check_bind

            # Refuse an unguarded dashboard beyond loopback before anything listens.
            check_bind(s.admin)
        upgrade(s.database.url, busy_timeout_ms=s.database.busy_timeout_ms)
        self.engine = make_engine(s.database)
        self.session_factory = make_session_factory(self.engine)
        self.membership = Membership(s, self.role)
        self.membership.join()
        shared = self.membership.shared
        if shared:
            check_shared_storage(self.session_factory, s.storage.dir)
        if serving:
            self.membership.check_cluster_jobs()
        self.heartbeat = Heartbeat(self.session_factory, self.membership, s.cluster.heartbeat_s)
        self.heartbeat.start()
        address = self._start_serving(shared) if serving else None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        notify_others = None
        if shared:
            factory, name = self.session_factory, self.membership.name

            def notify_others(job_ids: list[str]) -> None:
                notify(factory, name, job_ids)

        installed = install_jobs(self.scheduler, s, self.session_factory,
                                 JOB_MODULES if serving else WORKER_MODULES, notify_others)
        self._install_membership_jobs(serving)
        self.scheduler.start()
        if shared:
            self.wakes = WakeListener(s.database.url, self.membership.name, self.scheduler)
            self.wakes.start()
        log.info("vaenode serving" if serving else "vaenode worker running",
                 extra={"address": f"{address[0]}:{address[1]}" if address else None,
                        "node": self.membership.name, "role": self.role,
                        "jobs": ",".join(installed)})
        return address

    def _install_membership_jobs(self, serving: bool) -> None:
        """The heartbeat; on a shared database the periodic check of the membership session
        (and, on a node that may run the cluster-wide jobs, the try to take them over); on
        such a node the gate of those jobs."""
        assert self.scheduler is not None and self.membership is not None
        assert self.heartbeat is not None
        c = self.settings.cluster
        membership, heartbeat = self.membership, self.heartbeat

        def beat() -> None:
            try:
                heartbeat.beat()
            except Exception as exc:  # the database is away: the row goes stale meanwhile
                log.warning("heartbeat not recorded: %s", exc)

        def check() -> None:
            held = membership.cluster_jobs.is_set()
            if membership.check_cluster_jobs(take=serving) != held:
                beat()  # the nodes view shows the change now, not at the next beat

        self.scheduler.add_job(beat, "interval", seconds=c.heartbeat_s, id=HEARTBEAT_JOB_ID,
                               max_instances=1, coalesce=True)
        if serving:
            run_on_one_node(self.scheduler, membership)
        if membership.shared:
            self.scheduler.add_job(check, "interval", seconds=c.takeover_check_s,
                                   id=MEMBERSHIP_JOB_ID, max_instances=1, coalesce=True)

    def _start_serving(self, shared: bool) -> tuple[str, int]:
        """The dashboard, the store and the DICOM listener; returns the listening address."""
        s = self.settings
        assert self.session_factory is not None
        if s.admin.enabled:
            from node.admin.app import start_in_thread

            # Before the SCP: a dashboard that cannot listen (port taken) stops start-up while
            # nothing else runs yet.
            self.dashboard = start_in_thread(s, self.session_factory)
        self.store = Store(s.storage, self.session_factory)
        self.store.recover()  # before any listener: see node/ingest/listeners.py
        started = time.time()
        if s.dicom.listener_processes > 1:
            # The listener processes have their own stores; this one only recovered.
            self.listeners = ListenerPool(s, grace_s=SHUTDOWN_GRACE_S)
            address = self.listeners.start()
        else:
            self.store.start()
            self.scp = Scp(s.dicom, self.store, self.session_factory)
            address = self.scp.start()
        # Temporary files of a previous run: a walk of the whole archive, so not before listening.
        sweep_before = started - SHARED_SWEEP_MARGIN_S if shared else started
        threading.Thread(target=self.store.sweep_partials, args=(sweep_before,),
                         name="storage-sweep", daemon=True).start()
        return address

    def stop(self) -> None:
        """Stop accepting, finish in-flight associations, stop the jobs, close the database."""
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.scp is not None:
            self.scp.stop(grace_s=SHUTDOWN_GRACE_S)
        if self.listeners is not None:
            self.listeners.stop()
        if self.store is not None:
            self.store.close()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.wakes is not None:
            self.wakes.stop()
        if self.heartbeat is not None:
            try:
                self.heartbeat.stop()
            except Exception as exc:  # the database is gone: the row goes stale, shown lost
                log.warning("cannot record this node's stop: %s", exc)
        if self.membership is not None:
            self.membership.leave()
        if self.engine is not None:
            self.engine.dispose()
        log.info("vaenode stopped")

    def run_until_signal(self) -> None:
        """Start, then block until SIGTERM or SIGINT, then stop."""
        stop = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            log.info("signal received, shutting down", extra={"signal": name})
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            self.start()
            while not stop.wait(1.0):
                if self.listeners is not None:
                    self.listeners.check()  # restarts a dead one, raises if they keep dying
        finally:
            self.stop()
