"""The queue database on a real PostgreSQL server (private cluster on 127.0.0.1): the Alembic
revisions both ways, workers claiming from one queue at once (SKIP LOCKED), and ingest through
the real node with four senders at once."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic import command
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.orm import sessionmaker

from node.config import LearningSettings
from node.queue import references as refs
from node.queue import repo
from node.queue.migrate import alembic_config, current_revision, head_revision, upgrade
from node.queue.models import Instance, Series, SeriesEvent, StationReference, utcnow
from node.worker.station import BundleScale, settle_reference
from tests.helpers import dcmtk
from tests.helpers.claims import drain_queue
from tests.helpers.learning import KEY, add_learning_series, site_scores, write_learning_series
from tests.helpers.node import VAENODE, start_node
from tests.helpers.postgres import Postgres
from tests.helpers.records import count_driver_path, driver_path_off, record_scenario
from tests.helpers.synthetic import write_ct_series

pytestmark = pytest.mark.e2e


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_up_down_and_up_again(postgres: Postgres) -> None:
    upgrade(postgres.url)
    assert current_revision(postgres.url) == head_revision()
    assert {"series", "instances", "reports", "outbox", "admin_actions"} <= _tables(postgres.url)
    command.downgrade(alembic_config(postgres.url), "base")
    assert current_revision(postgres.url) is None
    assert _tables(postgres.url) <= {"alembic_version"}
    upgrade(postgres.url)
    assert current_revision(postgres.url) == head_revision()


def test_node_ingests_four_senders_into_postgres(postgres: Postgres, tmp_path: Path) -> None:
    series = [write_ct_series(tmp_path / f"s{i}", 25, rows=64, columns=64, seed=i)
              for i in range(4)]
    for path in series[0]:  # one series declares its image count (the count rule's SQL)
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = 25
        ds.save_as(path, enforce_file_format=True)
    node = start_node(tmp_path / "node", sections={
        "database": {"url": postgres.url}})
    try:
        with ThreadPoolExecutor(4) as pool:
            sent = list(pool.map(
                lambda files: dcmtk.storescu(node.port, files, called_aet=node.ae_title), series))
        assert all(p.returncode == 0 for p in sent), [p.stderr for p in sent]
        engine = create_engine(postgres.url)
        try:
            with engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(Instance)).scalar() == 100
                counts = conn.execute(select(Series.instance_count)).scalars().all()
        finally:
            engine.dispose()
        assert sorted(counts) == [25, 25, 25, 25]
        listed = subprocess.run(
            [str(VAENODE), "queue", "list", "--json", "--config", str(node.config_path)],
            capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
        assert sorted(r["instance_count"] for r in rows) == [25, 25, 25, 25]
        # Each storescu released its association: each series is complete 2 s later, well
        # before the 30 s idle time (the release timestamps compared in PostgreSQL).
        engine = create_engine(postgres.url)
        try:
            deadline = time.monotonic() + 20
            reasons: list[str | None] = []
            while time.monotonic() < deadline and len(reasons) < 4:
                with engine.connect() as conn:
                    reasons = list(conn.execute(
                        select(SeriesEvent.reason).where(SeriesEvent.to_status == "queued")
                    ).scalars())
                time.sleep(0.2)
            with engine.connect() as conn:
                expected = conn.execute(select(Series.expected_instances)).scalars().all()
        finally:
            engine.dispose()
        assert reasons == ["association released by the sender"] * 4
        # The declared count was noted at the release (PostgreSQL's CASE), and met.
        assert sorted(expected, key=lambda e: e is None) == [25, None, None, None]
    finally:
        node.stop()


def test_concurrent_claims_never_share_a_series(postgres: Postgres) -> None:
    """Four workers (own connections) drain 20 queued series: each is claimed exactly once."""
    url = postgres.new_database("claims")
    upgrade(url)
    engine = create_engine(url, pool_size=8)
    factory = sessionmaker(engine, expire_on_commit=False)
    try:
        old = utcnow() - timedelta(seconds=60)
        for i in range(20):
            uid = f"1.2.3.{100 + i}"
            with factory.begin() as session:
                repo.record_instance(session, repo.InstanceRecord(
                    study_instance_uid="1.2.3", series_instance_uid=uid,
                    sop_instance_uid=f"{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"1.2.3/{uid}/{uid}.1.dcm",
                    size_bytes=100, instance_number=1, modality="CT", series_description="d",
                    body_part="HEAD", calling_aet="SCU", peer_address="127.0.0.1:1",
                    received_at=old))
        with factory() as session:
            ids = session.scalars(select(Series.id)).all()
        for series_id in ids:
            with factory.begin() as session:
                repo.mark_queued(session, series_id, idle_before=utcnow())
        claims = drain_queue(factory)
        claimed = [series_id for _, series_id in claims]
        assert sorted(claimed) == sorted(ids)  # every one, once
        with factory() as session:
            rows = session.execute(select(Series.status, Series.worker_id)).all()
        assert {str(status) for status, _ in rows} == {"processing"}
        assert sorted(w for _, w in rows) == sorted(w for w, _ in claims)
    finally:
        engine.dispose()


def test_record_instance_driver_sql_writes_what_sqlalchemy_writes(
        postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver-SQL path of record_instance (psycopg, %s parameters) stores the same rows."""
    outcomes = []
    for name, fast in (("record_fast", True), ("record_slow", False)):
        url = postgres.new_database(name)
        upgrade(url)
        engine = create_engine(url)
        try:
            with monkeypatch.context() as m:
                used = count_driver_path(m)
                if not fast:
                    driver_path_off(m)
                outcomes.append(record_scenario(sessionmaker(engine, expire_on_commit=False)))
                assert used[0] == (4 if fast else 0)
        finally:
            engine.dispose()
    assert outcomes[0] == outcomes[1]


def test_two_workers_storing_the_last_learning_series_calibrate_the_station_once(
    postgres: Postgres,
) -> None:
    """Four workers create the same station's reference at once: one row. Two store the
    station's last two learning series at once: whichever gets the reference's row lock
    second sees the other's series and calibrates it, exactly once (without the lock each
    would count one short and neither would)."""
    url = postgres.new_database("learning")
    upgrade(url)
    engine = create_engine(url, pool_size=8)
    factory = sessionmaker(engine, expire_on_commit=False)
    learning = LearningSettings(series=5)
    scale = BundleScale("brain-t1", "0.1.0", -36000.0, -2400.0, 0.01,
                        tuple(float(q) for q in range(201)))
    try:
        barrier = threading.Barrier(4)

        def create() -> int:
            barrier.wait()
            with factory() as session:
                return refs.ensure_reference(session, KEY).id

        with ThreadPoolExecutor(4) as pool:
            ids = set(pool.map(lambda _: create(), range(4)))
        [reference_id] = ids
        site = site_scores(5, seed=7)
        for scores in site[:3]:
            add_learning_series(factory, reference_id, scores)
        both = threading.Barrier(2)

        def store_last(scores: Any) -> bool:
            with factory() as session, session.begin():
                write_learning_series(session, reference_id, scores)
                both.wait()
                calibrated = settle_reference(session, learning, reference_id, scale)
                time.sleep(0.5)  # hold the lock: the other one waits for it meanwhile
                return calibrated

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(store_last, site[3:]))
        assert sorted(outcomes) == [False, True]
        with factory() as session:
            row = session.get(StationReference, reference_id)
            count = session.scalar(select(func.count()).select_from(StationReference))
        assert count == 1 and row is not None and row.state == "calibrated"
        assert (row.series_used or 0) + (row.series_trimmed or 0) == 5
    finally:
        engine.dispose()
