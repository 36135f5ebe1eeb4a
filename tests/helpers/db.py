"""A migrated queue database for a test: the one way every test suite gets its session factory."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import upgrade


@contextmanager
def migrated_database(database: DatabaseSettings) -> Iterator[sessionmaker[Session]]:
    """Apply every migration to ``database``, yield a session factory on it, then dispose of
    its engine (SQLite files stay open otherwise until the process ends)."""
    upgrade(database.url)
    engine = make_engine(database)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def insert_done_series(db: sqlite3.Connection, series_id: int, uid: str, at: str) -> None:
    """A ``done`` series row written with plain SQL into a database at an older revision (the
    ORM models describe the newest schema only): what a migration test upgrades from."""
    db.execute("INSERT INTO series (id, study_instance_uid, series_instance_uid, "
               "instance_count, first_received_at, last_received_at, status, attempts, "
               "updated_at) VALUES (?, '1.2', ?, 1, ?, ?, 'done', 1, ?)",
               (series_id, uid, at, at, at))
