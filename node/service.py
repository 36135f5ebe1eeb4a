"""The long-running node: migrate, listen, schedule the jobs, stop cleanly.

``vaenode serve`` builds a :class:`Service` from the settings and runs it until SIGTERM/SIGINT.
Scheduled work comes from :data:`JOB_MODULES`: each module exposes
``install(scheduler, settings, session_factory) -> None``. An import error stops start-up: a
half-installed node would silently not score or not deliver. A job whose run handed work on
(series queued, series scored) wakes the job that takes it (:data:`WAKES`), instead of leaving
it to that job's next poll: up to a poll interval saved at each hand-over.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.events import EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
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

#: Longest wait for in-flight associations at shutdown, in seconds.
SHUTDOWN_GRACE_S = 60.0


def install_jobs(
    scheduler: BackgroundScheduler,
    settings: Settings,
    session_factory: sessionmaker[Session],
    modules: tuple[str, ...] = JOB_MODULES,
) -> list[str]:
    """Import each job module and let it add its jobs; returns the modules installed."""
    for name in modules:
        importlib.import_module(name).install(scheduler, settings, session_factory)
    wake_on_hand_over(scheduler, [(importlib.import_module(a).JOB_ID,
                                   importlib.import_module(b).JOB_ID)
                                  for a, b in WAKES if a in modules and b in modules])
    return list(modules)


def wake_on_hand_over(scheduler: BaseScheduler, pairs: list[tuple[str, str]]) -> None:
    """When a run of the first job of a pair returns something truthy, run the second now
    (if it is installed: a disabled worker has no job). A job may wake several."""
    wakes: dict[str, list[str]] = {}
    for source, target in pairs:
        wakes.setdefault(source, []).append(target)

    def on_executed(event: JobExecutionEvent) -> None:
        if not event.retval:
            return
        for target in wakes.get(event.job_id, ()):
            job = scheduler.get_job(target)
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    scheduler.add_listener(on_executed, EVENT_JOB_EXECUTED)


class Service:
    """The parts of ``vaenode serve``, started and stopped in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.session_factory: sessionmaker[Session] | None = None
        self.scp: Scp | None = None
        self.store: Store | None = None
        self.listeners: ListenerPool | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.dashboard: RunningDashboard | None = None

    def start(self) -> tuple[str, int]:
        """Migrate, listen, start the scheduler; returns the listening address."""
        s = self.settings
        if s.admin.enabled:
            # Imported only when enabled: the web stack is heavy and optional.
            from node.admin.auth import check_bind

            # Refuse an unguarded dashboard beyond loopback before anything listens.
            check_bind(s.admin)
        upgrade(s.database.url, busy_timeout_ms=s.database.busy_timeout_ms)
        self.engine = make_engine(s.database)
        self.session_factory = make_session_factory(self.engine)
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
        threading.Thread(target=self.store.sweep_partials, args=(started,),
                         name="storage-sweep", daemon=True).start()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        installed = install_jobs(self.scheduler, s, self.session_factory)
        self.scheduler.start()
        log.info("vaenode serving", extra={"address": f"{address[0]}:{address[1]}",
                                           "jobs": ",".join(installed)})
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
