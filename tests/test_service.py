"""The service's job wiring: a job that hands work on wakes the job that takes it."""

from __future__ import annotations

import importlib
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from node.cluster.membership import ROLE_RECEIVER, Membership
from node.config import Settings
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import upgrade
from node.report import jobs as report_jobs
from node.service import (
    CLUSTER_JOB_IDS,
    JOB_MODULES,
    WAKES,
    install_jobs,
    run_on_one_node,
    wake_on_hand_over,
)


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


def test_one_job_wakes_every_target_it_hands_over_to() -> None:
    """The worker hands a scored series to the report outbox and to the alerts alike."""
    scheduler = BackgroundScheduler(timezone="UTC")
    woken = {"deliver": threading.Event(), "alert": threading.Event()}
    scheduler.add_job(lambda: 1, "interval", hours=1, id="worker")
    for name, event in woken.items():
        scheduler.add_job(event.set, "interval", hours=1, id=name)
    wake_on_hand_over(scheduler, [("worker", "deliver"), ("worker", "alert")])
    scheduler.start()
    try:
        scheduler.get_job("worker").modify(next_run_time=_now())
        assert woken["deliver"].wait(10.0) and woken["alert"].wait(10.0)
    finally:
        scheduler.shutdown(wait=True)


def test_every_wake_pairs_two_installed_job_modules() -> None:
    for first, second in WAKES:
        assert first in JOB_MODULES and second in JOB_MODULES
        ids = importlib.import_module(first).JOB_ID, importlib.import_module(second).JOB_ID
        assert all(isinstance(i, str) for i in ids) and ids[0] != ids[1]


def _now() -> datetime:
    return datetime.now(UTC)


def test_a_woken_delivery_job_does_not_overlap_a_running_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delivery job runs once at a time; a wake while it runs returns at once, without
    APScheduler's "maximum number of running instances" warning. (The real delivery run is
    slowed down by a wrapper, as a slow PACS would.)"""
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    upgrade(url)
    settings = Settings.model_validate({"database": {"url": url},
                                        "delivery": {"poll_interval_s": 3600}})
    engine = make_engine(settings.database)
    scheduler = BackgroundScheduler(timezone="UTC")
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = report_jobs.deliver_due

    def slow_delivery(session_factory: sessionmaker[Session], s: Settings) -> int:
        calls.append(1)
        entered.set()
        release.wait(10)
        return real(session_factory, s)

    monkeypatch.setattr(report_jobs, "deliver_due", slow_delivery)
    try:
        report_jobs.install(scheduler, settings, make_session_factory(engine))
        with caplog.at_level("WARNING", logger="apscheduler"):
            scheduler.start()  # the job's first run starts now and waits in slow_delivery
            assert entered.wait(10)
            for _ in range(3):  # woken while it runs
                scheduler.get_job(report_jobs.JOB_ID).modify(next_run_time=_now())
                time.sleep(0.3)
            release.set()
            time.sleep(0.5)
        assert calls == [1]
        assert not [r for r in caplog.records if "maximum number" in r.getMessage()]
    finally:
        release.set()
        scheduler.shutdown(wait=True)
        engine.dispose()


def test_cluster_jobs_run_only_while_this_node_holds_them(tmp_path: Path) -> None:
    """Every job of CLUSTER_JOB_IDS that a node with everything configured installs is gated
    by the membership's flag; the worker's job and the takeover check are not."""
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    upgrade(url)
    settings = Settings.model_validate({
        "database": {"url": url}, "cluster": {"node_name": "n1"},
        "alerts": {"urls": ["http://127.0.0.1:9/a"], "ops_urls": ["http://127.0.0.1:9/o"]},
        "worker": {"enabled": False}})
    engine = make_engine(settings.database)
    scheduler = BackgroundScheduler(timezone="UTC")
    membership = Membership(settings, ROLE_RECEIVER)
    try:
        install_jobs(scheduler, settings, make_session_factory(engine))
        assert run_on_one_node(scheduler, membership) == list(CLUSTER_JOB_IDS)
        job = scheduler.get_job("queue.idle-series")
        assert job.func(*job.args, **job.kwargs) is None  # not held: nothing ran
        membership.cluster_jobs.set()
        assert job.func(*job.args, **job.kwargs) == 0  # held: the completion ran (none due)
    finally:
        engine.dispose()


def test_cross_node_wakes_name_every_taker_even_if_not_installed_here() -> None:
    """A receiver without a worker still wakes the workers elsewhere when it queues series."""
    scheduler = BackgroundScheduler(timezone="UTC")
    asked: list[list[str]] = []
    done = threading.Event()
    scheduler.add_job(lambda: 3, "interval", hours=1, id="queue")

    def notify_others(job_ids: list[str]) -> None:
        asked.append(job_ids)
        done.set()

    wake_on_hand_over(scheduler, [("queue", "worker"), ("queue", "alerts")], notify_others)
    scheduler.start()
    try:
        scheduler.get_job("queue").modify(next_run_time=_now())
        assert done.wait(10.0)
        assert asked == [["worker", "alerts"]]
    finally:
        scheduler.shutdown(wait=True)
