"""Fixtures of the dashboard tests: a migrated database, a real dashboard server, HTTP calls."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.admin.app import RunningDashboard, start_in_thread
from node.config import Settings
from node.queue.db import make_engine, make_session_factory
from node.queue.migrate import upgrade


@dataclass
class Reply:
    """An HTTP answer, whatever its status."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    follow: bool = True,
) -> Reply:
    """GET (or POST with ``data``) ``url`` with urllib; 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as resp:
            return Reply(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers.items()), exc.read())


def admin_settings(tmp_path: Path, **admin: Any) -> Settings:
    """Settings with a temp database and storage and the dashboard on a free loopback port."""
    (tmp_path / "storage").mkdir(exist_ok=True)
    return Settings.model_validate(
        {
            "storage": {"dir": str(tmp_path / "storage"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{tmp_path / 'queue.db'}"},
            "admin": {"bind_address": "127.0.0.1", "port": 0, **admin},
        }
    )


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build dashboard settings on this test's temp folder (admin keys as arguments)."""
    return lambda **admin: admin_settings(tmp_path, **admin)


@pytest.fixture
def session_factory_for() -> Iterator[Callable[[Settings], sessionmaker[Session]]]:
    """Migrate the settings' database to head and return a session factory on it."""
    engines = []

    def build(settings: Settings) -> sessionmaker[Session]:
        upgrade(settings.database.url)
        engine = make_engine(settings.database)
        engines.append(engine)
        return make_session_factory(engine)

    yield build
    for engine in engines:
        engine.dispose()


@pytest.fixture
def run_dashboard() -> Iterator[Callable[[Settings, sessionmaker[Session]], RunningDashboard]]:
    """Start real dashboards (uvicorn on loopback); all are stopped at the end of the test."""
    running: list[RunningDashboard] = []

    def start(settings: Settings, session_factory: sessionmaker[Session]) -> RunningDashboard:
        dashboard = start_in_thread(settings, session_factory)
        running.append(dashboard)
        return dashboard

    yield start
    for dashboard in running:
        dashboard.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny but real model bundle, trained once per test session by the project's code."""
    from tests.helpers.tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))
