"""Fixtures of the alert tests: a migrated temp database and a real webhook endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings
from tests.helpers.alerts import AlertReceiver
from tests.helpers.db import migrated_database


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'q.db'}")) as f:
        yield f


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    r = AlertReceiver()
    yield r
    r.close()
