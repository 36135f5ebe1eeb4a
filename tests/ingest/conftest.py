"""Fixtures of the ingest tests: a migrated temp database, a store on it, data folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.config import DatabaseSettings, StorageSettings
from node.ingest.store import Store
from tests.helpers.db import migrated_database
from tests.helpers.ingest_data import pydicom_data_dir


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_database(DatabaseSettings(url=f"sqlite:///{tmp_path / 'queue.db'}")) as f:
        yield f


@pytest.fixture
def store(tmp_path: Path, session_factory: sessionmaker[Session]) -> Store:
    return Store(StorageSettings(dir=tmp_path / "storage", min_free_mb=0), session_factory)


@pytest.fixture(scope="session")
def pydicom_data() -> Path:
    """The pydicom-data package's files (compressed and unusual encodings)."""
    return pydicom_data_dir()
