"""What several nodes rely on, one mechanism at a time, on a real PostgreSQL (private cluster on
127.0.0.1): a node's name and the cluster-wide jobs held by session advisory locks and handed
over when a session ends; the row lock that keeps an instance out of a series being queued;
expired leases taken back once; a problem told once by checks that overlap; the shared
storage's marker; the nodes view. And SQLite refusing a second node."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from node.alerts.problems import Problem, raise_problems
from node.cluster.membership import ROLE_RECEIVER, ROLE_WORKER, Membership, with_node_name
from node.cluster.nodes import Heartbeat, forget, list_nodes
from node.cluster.storage_mark import MARKER, check_shared_storage
from node.config import Settings
from node.errors import ConfigError, QueueConflict
from node.queue import repo
from node.queue.migrate import alembic_config, current_revision, head_revision, upgrade
from node.queue.models import Alert, Series, utcnow
from node.queue.states import SeriesState
from node.service import role_of
from tests.helpers.node import VAENODE, to_toml
from tests.helpers.postgres import Postgres
from tests.helpers.records import mr_instance

pytestmark = pytest.mark.e2e


@pytest.fixture
def database(postgres: Postgres, request: pytest.FixtureRequest) -> Iterator[str]:
    url = postgres.new_database(request.node.name.lower()[:60])
    upgrade(url)
    yield url


@pytest.fixture
def factory(database: str) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(database, pool_size=8)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def _member(url: str, name: str, role: str = ROLE_RECEIVER) -> Membership:
    settings = Settings.model_validate({"database": {"url": url},
                                        "cluster": {"node_name": name}})
    return Membership(settings, role)


def test_a_name_is_held_by_one_process_at_a_time(database: str) -> None:
    first, second = _member(database, "mr-1"), _member(database, "mr-1")
    first.join()
    try:
        with pytest.raises(ConfigError, match="another running node is named 'mr-1'"):
            second.join(wait_s=0)
    finally:
        first.leave()
    second.join(wait_s=0)  # the name is free once its holder's session ended
    second.leave()


def test_the_cluster_jobs_are_held_by_one_node_and_handed_over(database: str) -> None:
    a, b = _member(database, "a"), _member(database, "b")
    a.join()
    b.join()
    try:
        assert a.check_cluster_jobs() is True
        assert b.check_cluster_jobs() is False
        assert a.check_cluster_jobs() is True  # kept, checked again
        # a's session dies (the database restarted it, the network cut it): b takes over at
        # its next check, and a knows it no longer runs the jobs.
        engine = create_engine(database)
        with engine.connect() as conn:
            killed = conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid = hashtext('a')::oid AND pid <> pg_backend_pid()")).scalars().all()
            conn.commit()
        engine.dispose()
        assert killed == [True]
        assert b.check_cluster_jobs() is True
        assert a.check_cluster_jobs() is False
        assert not a.cluster_jobs.is_set()
        assert a.check_cluster_jobs() is False  # a has its name back, b keeps the jobs
    finally:
        a.leave()
        b.leave()
    # A clean stop hands the jobs over too.
    c = _member(database, "c")
    c.join()
    try:
        assert c.check_cluster_jobs() is True
    finally:
        c.leave()


def test_sqlite_belongs_to_one_node(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    first, second = _member(url, "one"), _member(url, "two")
    first.join()
    try:
        assert first.check_cluster_jobs() and first.cluster_jobs.is_set()
        with pytest.raises(ConfigError, match="an SQLite queue belongs to one node"):
            second.join()
    finally:
        first.leave()
    second.join()
    second.leave()


def test_vaenode_worker_refuses_sqlite(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(to_toml({"database": {"url": f"sqlite:///{tmp_path / 'q.db'}"}}))
    proc = subprocess.run([str(VAENODE), "worker", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "SQLite cannot" in proc.stderr and "[database].url" in proc.stderr


def test_migration_0014_adds_and_removes_the_cluster_tables_on_sqlite(tmp_path: Path) -> None:
    """Down to 0013 and up again on SQLite (PostgreSQL goes down to base in
    tests/queue/test_postgres.py); series rows are untouched."""
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    upgrade(url, revision="0014_nodes")
    engine = create_engine(url)
    try:
        factory = sessionmaker(engine, expire_on_commit=False)
        series_id = _receiving_series(factory, "1.2.9")
        check_shared_storage(factory, tmp_path / "shared")
        assert {"nodes", "cluster"} <= set(inspect(engine).get_table_names())
        command.downgrade(alembic_config(url), "0013_station_references")
        assert current_revision(url) == "0013_station_references"
        assert not {"nodes", "cluster"} & set(inspect(engine).get_table_names())
        upgrade(url)
        assert current_revision(url) == head_revision()
        with factory() as session:
            assert session.scalar(select(Series.id).where(
                Series.series_instance_uid == "1.2.9")) == series_id
    finally:
        engine.dispose()


def test_default_names_tell_a_worker_from_a_receiver() -> None:
    settings = Settings.model_validate({"dicom": {"ae_title": "QC"}})
    receiver = with_node_name(settings, ROLE_RECEIVER).cluster.node_name
    worker = with_node_name(settings, ROLE_WORKER).cluster.node_name
    assert receiver is not None and worker is not None
    assert receiver.endswith("/QC") and worker.endswith("/worker")
    named = Settings.model_validate({"cluster": {"node_name": "gpu-1"}})
    assert with_node_name(named, ROLE_WORKER).cluster.node_name == "gpu-1"


def _receiving_series(factory: sessionmaker[Session], uid: str) -> int:
    with factory.begin() as session:
        return repo.record_instance(
            session, mr_instance("1.2.3", uid, utcnow() - timedelta(seconds=60))).series_id


def test_an_instance_arriving_while_its_series_is_queued_is_never_left_out(
        factory: sessionmaker[Session]) -> None:
    """Ingest locks the series row it adds to: the completion (another node) waits for its
    commit and finds the series no longer idle, instead of queueing it without the instance."""
    series_id = _receiving_series(factory, "1.2.3.1")
    ingest = factory()
    ingest.begin()
    repo.record_instance(ingest, mr_instance("1.2.3", "1.2.3.1", utcnow(),
                                             sop_instance_uid="1.2.3.1.2", path="a/b/2.dcm"))
    outcome: list[object] = []

    def complete() -> None:
        try:
            with factory.begin() as session:
                outcome.append(repo.mark_queued(session, series_id,
                                                idle_before=utcnow() - timedelta(seconds=30)))
        except QueueConflict as exc:
            outcome.append(exc)

    completion = threading.Thread(target=complete)
    completion.start()
    completion.join(timeout=1.0)
    assert completion.is_alive()  # waiting for ingest's row lock
    ingest.commit()
    ingest.close()
    completion.join(timeout=30)
    assert isinstance(outcome[0], QueueConflict)
    with factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        assert series.status is SeriesState.RECEIVING and series.instance_count == 2


def test_an_instance_arriving_while_its_series_is_being_queued_reopens_it(
        factory: sessionmaker[Session]) -> None:
    """The other order: the completion has queued the series but not committed yet. Ingest
    waits for it (the row lock taken when ingest reads the series), then finds the series
    queued and reopens it; without the lock it would add the instance to a queued series that
    a worker may already be reading."""
    series_id = _receiving_series(factory, "1.2.3.2")
    completion = factory()
    completion.begin()
    repo.mark_queued(completion, series_id, idle_before=utcnow())
    done = threading.Event()

    def ingest() -> None:
        with factory.begin() as session:
            repo.record_instance(session, mr_instance("1.2.3", "1.2.3.2", utcnow(),
                                                      sop_instance_uid="1.2.3.2.2",
                                                      path="a/b/3.dcm"))
        done.set()

    arriving = threading.Thread(target=ingest)
    arriving.start()
    assert not done.wait(1.0)  # waiting for the completion's commit
    completion.commit()
    completion.close()
    arriving.join(timeout=30)
    assert done.is_set()
    with factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        assert series.status is SeriesState.RECEIVING and series.instance_count == 2
        assert series.status_reason == "new instance while queued"


def test_an_expired_lease_another_worker_is_taking_back_is_skipped(
        factory: sessionmaker[Session]) -> None:
    series_id = _receiving_series(factory, "1.2.3.3")
    with factory.begin() as session:
        repo.mark_queued(session, series_id, idle_before=utcnow())
        repo.claim_next_queued(session, "dead-worker", lease_s=0.001)
    taking = factory()
    taking.begin()
    assert [s.id for s in repo.requeue_expired_leases(taking, max_attempts=3)] == [series_id]
    with factory() as other:  # does not wait for the first, and takes nothing
        assert repo.requeue_expired_leases(other, max_attempts=3) == []
    taking.commit()
    taking.close()
    with factory() as session:
        assert session.get(Series, series_id).status is SeriesState.QUEUED  # type: ignore[union-attr]


def test_overlapping_problem_checks_tell_a_problem_once(database: str,
                                                       factory: sessionmaker[Session]) -> None:
    settings = Settings.model_validate({"database": {"url": database},
                                        "alerts": {"ops_urls": ["http://127.0.0.1:9/hook"]}})
    problem = Problem("storage_low", "/srv/vaenode", "storage is running out", "text")
    start = threading.Barrier(4)
    told: list[int] = []

    def check() -> None:
        start.wait()
        told.append(raise_problems(factory, settings, [problem], utcnow()))

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(told) == [0, 0, 0, 1]
    with factory() as session:
        assert len(session.scalars(select(Alert.id)).all()) == 1


def test_the_shared_folder_is_marked_and_checked(factory: sessionmaker[Session],
                                                 tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    storage_id = check_shared_storage(factory, shared)
    assert (shared / MARKER).read_text().strip() == storage_id
    assert check_shared_storage(factory, shared) == storage_id  # a second node: the same
    with pytest.raises(ConfigError, match="is the shared file system mounted"):
        check_shared_storage(factory, tmp_path / "local-disk")
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text("0000\n")
    with pytest.raises(ConfigError, match="belongs to another deployment"):
        check_shared_storage(factory, other)


def test_the_nodes_view(database: str, factory: sessionmaker[Session]) -> None:
    worker, receiver = _member(database, "w"), _member(database, "r")
    worker.role = ROLE_WORKER
    worker.join()
    receiver.join()
    try:
        receiver.check_cluster_jobs()
        beats = {m.name: Heartbeat(factory, m, heartbeat_s=10.0) for m in (worker, receiver)}
        for beat in beats.values():
            beat.start()
        series_id = _receiving_series(factory, "1.2.3.4")
        with factory.begin() as session:
            repo.mark_queued(session, series_id, idle_before=utcnow())
            repo.claim_next_queued(session, "w", lease_s=60)
        with factory() as session:
            view = {n.name: n for n in list_nodes(session)}
        assert {n: (v.role, v.state, v.cluster_jobs, v.scoring) for n, v in view.items()} == {
            "r": ("receiver", "up", True, ()), "w": ("worker", "up", False, ("1.2.3.4",))}
        assert view["w"].clock_offset_s is not None and abs(view["w"].clock_offset_s) < 2
        with factory() as session:  # three beats later without a word: lost
            late = {n.name: n.state for n in list_nodes(session, utcnow() + timedelta(seconds=31))}
        assert late == {"r": "lost", "w": "lost"}
        beats["r"].stop()
        with factory.begin() as session:
            assert {n.name: n.state for n in list_nodes(session)}["r"] == "stopped"
            assert forget(session, "r") is True
            with pytest.raises(ValueError, match="is up"):
                forget(session, "w")
            assert forget(session, "nobody") is False
        beats["r"].beat()  # a forgotten node that beats again is back
        with factory() as session:
            assert sorted(n.name for n in list_nodes(session)) == ["r", "w"]
    finally:
        worker.leave()
        receiver.leave()


def test_roles_from_one_config() -> None:
    pg = {"database": {"url": "postgresql+psycopg://vaenode@127.0.0.1:1/vaenode"}}
    assert role_of(Settings.model_validate(pg), worker_command=False) == "all"
    receiver = Settings.model_validate({**pg, "worker": {"enabled": False}})
    assert role_of(receiver, worker_command=False) == "receiver"
    assert role_of(Settings.model_validate(pg), worker_command=True) == "worker"
    with pytest.raises(ConfigError, match="nothing to do"):
        role_of(receiver, worker_command=True)
