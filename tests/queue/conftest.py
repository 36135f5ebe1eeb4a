"""Fixtures of the queue tests: a temp SQLite database migrated by Alembic, as in production."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings
from tests.helpers.db import migrated_database


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'queue.db'}"


@pytest.fixture
def session_factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    with migrated_database(DatabaseSettings(url=db_url, busy_timeout_ms=10000)) as f:
        yield f
