"""A migrated queue database for a test: the one way every test suite gets its session factory."""

from __future__ import annotations

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
