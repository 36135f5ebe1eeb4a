"""The service's job wiring: a job that hands work on wakes the job that takes it."""

from __future__ import annotations

import importlib
import threading
import time
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from node.service import JOB_MODULES, WAKES, wake_on_hand_over


def test_a_hand_over_runs_the_next_job_at_once() -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    queued = iter([0, 2])  # the first run queues nothing, the second two series
    woken = threading.Event()
    runs: list[float] = []

    def queue_job() -> int:
        return next(queued, 0)

    def worker_job() -> list[str]:
        runs.append(time.monotonic())
        woken.set()
        return []  # scored nothing: the delivery job is not woken

    delivered: list[float] = []
    # Interval jobs an hour apart: anything that runs within seconds was woken.
    scheduler.add_job(queue_job, "interval", hours=1, id="queue")
    scheduler.add_job(worker_job, "interval", hours=1, id="worker")
    scheduler.add_job(lambda: delivered.append(time.monotonic()), "interval", hours=1,
                      id="deliver")
    wake_on_hand_over(scheduler, [("queue", "worker"), ("worker", "deliver"),
                                  ("deliver", "not-installed")])
    scheduler.start()
    try:
        scheduler.get_job("queue").modify(next_run_time=_now())  # returns 0: no wake
        time.sleep(1.0)
        assert runs == []
        scheduler.get_job("queue").modify(next_run_time=_now())  # returns 2: wakes the worker
        assert woken.wait(10.0)
        time.sleep(0.5)
        assert len(runs) == 1 and delivered == []
        # A job without a target, or whose target is not installed, wakes nothing and fails
        # nothing.
        scheduler.get_job("deliver").modify(next_run_time=_now())
        time.sleep(0.5)
        assert len(delivered) == 1
    finally:
        scheduler.shutdown(wait=True)


def test_every_wake_pairs_two_installed_job_modules() -> None:
    for first, second in WAKES:
        assert first in JOB_MODULES and second in JOB_MODULES
        ids = importlib.import_module(first).JOB_ID, importlib.import_module(second).JOB_ID
        assert all(isinstance(i, str) for i in ids) and ids[0] != ids[1]


def _now() -> datetime:
    return datetime.now(UTC)
