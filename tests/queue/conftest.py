"""Fixtures of the queue tests: a temp SQLite database migrated by Alembic, as in production."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import upgrade


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    upgrade(url)
    return url


@pytest.fixture
def session_factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(DatabaseSettings(url=db_url, busy_timeout_ms=10000))
    yield make_session_factory(engine)
    engine.dispose()
