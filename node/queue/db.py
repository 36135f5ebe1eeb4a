"""Engine and session factory of the queue database.

SQLite is the embedded default: WAL mode (readers never block the writer), a busy timeout
(writers wait for each other instead of failing), ``synchronous=FULL`` (a commit is on disk when
it returns: ingest answers Success only after that) and foreign keys on. Every transaction starts
with ``BEGIN IMMEDIATE``: the write lock is taken up front, so two writers never both read and
then deadlock on the upgrade to a write lock, which the busy timeout cannot resolve.

Sessions that only read (the dashboard's pages, its metrics, health checks) come from
:func:`make_read_session_factory` and start with a plain (deferred) ``BEGIN`` instead: in WAL
mode such a transaction reads a snapshot without taking the write lock, so a dashboard page
neither waits for ingest's commits nor holds them up. They must never write (a deferred
transaction that tries to would fail at once instead of waiting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings

#: Execution option that makes an SQLite transaction start deferred (read-only sessions).
READ_ONLY_OPTION = "vaenode_read_only"


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def make_engine(settings: DatabaseSettings) -> Engine:
    """Create the engine for ``settings.url``, with the SQLite set-up described above.

    The folder of an SQLite file is created if missing, so a fresh checkout can run.
    """
    url = settings.url
    if (path := _sqlite_file(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)

    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": settings.busy_timeout_ms / 1000},
        pool_size=8,
        max_overflow=16,
    )
    busy_ms = settings.busy_timeout_ms

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level: SQLAlchemy's "begin" event below emits the BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (no expire): values are read
    once and handed on, never lazily reloaded across transactions."""
    return sessionmaker(engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reading only: with SQLite a deferred ``BEGIN`` (module docstring); with
    another database the same sessions as :func:`make_session_factory`."""
    return sessionmaker(engine.execution_options(**{READ_ONLY_OPTION: True}),
                        expire_on_commit=False)
