"""Apply the Alembic revisions in ``migrations/`` programmatically.

The schema exists only through these revisions (no ``create_all``): ``vaenode db upgrade``,
``vaenode serve`` and test fixtures all call :func:`upgrade`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from node.config import DatabaseSettings
from node.errors import ConfigError
from node.queue.db import make_engine

log = logging.getLogger(__name__)

#: Where the revisions are: the repository's folder (a checkout, an editable install), else the
#: copy a regular install puts under ``<prefix>/share/vaenode`` (pyproject.toml, data-files).
MIGRATIONS_DIRS = (
    Path(__file__).resolve().parents[2] / "migrations",
    Path(sys.prefix) / "share" / "vaenode" / "migrations",
)


def migrations_dir() -> Path:
    """The first folder of :data:`MIGRATIONS_DIRS` that holds the revisions."""
    for folder in MIGRATIONS_DIRS:
        if (folder / "env.py").is_file():
            return folder
    raise ConfigError("migrations folder not found at "
                      + " or ".join(str(f) for f in MIGRATIONS_DIRS))


def alembic_config(database_url: str, busy_timeout_ms: int = 30000) -> Config:
    """An Alembic configuration pointing at our migrations and at ``database_url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # "%" is ConfigParser interpolation syntax; URLs with escaped passwords contain it.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["busy_timeout_ms"] = busy_timeout_ms
    return cfg


def upgrade(database_url: str, revision: str = "head", busy_timeout_ms: int = 30000) -> None:
    """Bring the database at ``database_url`` up to ``revision`` (default: the newest)."""
    before = current_revision(database_url)
    command.upgrade(alembic_config(database_url, busy_timeout_ms), revision)
    after = current_revision(database_url)
    if after != before:
        log.info("database migrated", extra={"from_revision": before, "to_revision": after})


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine = make_engine(DatabaseSettings(url=database_url, busy_timeout_ms=30000))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision in ``migrations/``."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()
