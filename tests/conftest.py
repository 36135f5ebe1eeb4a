"""Fixtures shared by several test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.postgres import Postgres, start_postgres


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A private PostgreSQL cluster for the tests of one module (``new_database`` per test)."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()
